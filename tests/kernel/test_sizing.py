"""SHAPER_MAX_PREFIXES against the kernel: tries sized past the default hold what the default would
refuse, and a shaper of another size leaves them alone, saying which size to run with."""

from bench.apply import write_rules_file
from lab import Lab

BIG = 300_000  # past the default 262,144


def test_tries_sized_for_more_prefixes(tmp_path):
    big, small = tmp_path / "big.yaml", tmp_path / "small.yaml"
    write_rules_file(big, 1, BIG)
    write_rules_file(small, 1, 10)
    sized = {"SHAPER_MAX_PREFIXES": str(BIG)}
    with Lab() as lab:
        refused = lab.shaper("apply", "-f", str(big), check=False)
        assert refused.returncode == 2 and f"{BIG} destinations exceed 262144" in refused.stderr, refused.stderr
        assert "not attached" in lab.shaper("show").stdout  # refused before anything was touched
        lab.shaper("apply", "-f", str(big), env=sized)
        with lab.pinned_maps() as dp:
            assert dp.lpm.max_entries == BIG and dp.src_lpm.max_entries == BIG
            assert dp.map_entries() == BIG
        # Another size adopts nothing and changes nothing; reading and removing need no size.
        other = lab.shaper("apply", "-f", str(small), check=False)
        assert other.returncode != 0 and f"SHAPER_MAX_PREFIXES={BIG}" in other.stderr, other.stderr
        with lab.pinned_maps() as dp:
            assert dp.map_entries() == BIG
        assert "10.128.0.0/32,+299999" in lab.shaper("show").stdout
        lab.shaper("apply", "-f", str(small), env=sized)
        with lab.pinned_maps() as dp:
            assert dp.map_entries() == 10
        lab.shaper("reset")
        assert "not attached" in lab.shaper("show").stdout
