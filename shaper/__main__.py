from shaper.cli import main

main()
