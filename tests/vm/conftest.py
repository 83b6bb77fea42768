import os

# The guest tests run inside the VM (test_vm.py boots it); on the host they are not collected.
collect_ignore = [] if os.environ.get("SHAPER_IN_VM") else ["guest"]
