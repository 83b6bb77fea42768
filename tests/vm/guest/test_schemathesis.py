"""Schemathesis fuzzes a running daemon from its own OpenAPI document (bounded in time).

In the VM, whose kernel has sch_netem: on a kernel without it, a valid delay
rule is rightly a 501, which the fuzzer would count as a server error.
It runs inside the pod namespace against the daemon's loopback, with the token,
and checks every response: no 5xx, status codes and bodies as documented, no
schema-violating request accepted, 405 for undeclared methods.  Only
`positive_data_acceptance` is left out: some constraints cannot be written in
OpenAPI 3.0 (jitter needs delay, a rate's minimum inside a string, a
destination in one rule only), so a schema-valid request may rightly get 422.
`use_after_free` is left out too: its stateful phase sends `DELETE
/rules/{name}?dry_run=true`, which by design deletes nothing, and then
reports the rule as "still available" (ST301).
"""

import shutil
import subprocess
import sys
from pathlib import Path


TOKEN = "schemathesis-token"


def test_fuzz_the_api_from_its_openapi_document(lab, tmp_path):
    st = Path(sys.executable).parent / "st"
    assert st.exists() or shutil.which("st"), "schemathesis is not installed (make setup)"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    d = lab.daemon("--token-file", str(token_file))
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.pod}", str(st if st.exists() else shutil.which("st")), "run",
         "http://127.0.0.1:2332/openapi.json", "--header", f"Authorization: Bearer {TOKEN}",
         "--max-examples", "25", "--max-time", "150", "--seed", "20261121", "--workers", "1",
         "--exclude-checks", "positive_data_acceptance,use_after_free", "--suppress-health-check", "all",
         "--request-timeout", "30"],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    summary = proc.stdout[proc.stdout.find("SUMMARY"):] if "SUMMARY" in proc.stdout else proc.stdout[-3000:]
    print("\n" + summary[-2500:])
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-2000:]
    assert d.proc.poll() is None and d.request("GET", "/healthz")[0] == 200
    assert TOKEN not in d.log_text()
    assert d.stop() == 0
