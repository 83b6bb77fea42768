"""Does `make setup` install every program that shaper, its tests, the bench and the scripts run, on a fresh
Debian 12?

The list of programs is derived from the code, never kept by hand: Python argv literals (subprocess calls, the
`sh(...)`-style helpers that pass their arguments on as an argv, the program after `ip netns exec NS` and
`nsenter --net=...`, `shutil.which("prog")`) and the commands of the shell scripts and Makefile recipes.
What a program runs in turn (virtme-ng runs QEMU and a static busybox; podman runs runc) cannot be seen in
our code, so it is declared in INDIRECT, each entry naming the code that causes it.

A fresh machine is a `debootstrap --variant=minbase bookworm` root filesystem (cached in FRESH_CACHE); what
setup adds to it is apt's simulated install of setup's package list onto that root's dpkg status, plus the
console scripts of what pip installs into .venv. Each program is mapped to the Debian package that provides it
here (`dpkg -S`, across the /usr merge and symlinks). `python -m tests.support.fresh_machine` prints the report.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[2]
FRESH_CACHE = Path(os.environ.get("SHAPER_FRESH_CACHE", "/var/cache/shaper-fresh"))
SUITE = "bookworm"
PYTHON_DIRS = ("shaper", "lab", "tests", "bench")
SHELL_FILES = ("scripts/*.sh", ".ci/run", "deploy/*.sh")
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Use:
    program: str
    where: str  # "path:line" of the code that runs it


@dataclass(frozen=True)
class Need:
    """A program that our code makes another program run."""
    program: str  # a name looked up on PATH, or an absolute path or glob
    where: str
    why: str
    package: str | None = None  # when only this package's build of the program will do
    static: bool = False  # the program is copied into a VM's initramfs, so it must not need ld.so


INDIRECT = (
    Need("qemu-system-x86_64", "lab/__init__.py run_in_vm", "virtme-ng (vng) boots the VM with QEMU"),
    Need("busybox", "lab/__init__.py run_in_vm",
         "virtme-ng builds the guest's initramfs around a statically linked busybox "
         "(virtme/mkinitramfs.py find_busybox); Debian's `busybox` is dynamic", package="busybox-static",
         static=True),
    Need("modprobe", "lab/__init__.py run_in_vm", "the guest script loads sch_netem, sch_htb, cls_bpf, veth"),
    Need("/boot/vmlinuz-*-amd64", "lab/__init__.py vm_kernel", "the VM boots Debian's generic kernel"),
    Need("/usr/src/linux-headers-*-amd64/Makefile", "shaper/datapath/loader.py (bcc)",
         "bcc compiles the classifier against kernel headers (setup links them for a kernel without any)"),
    Need("runc", "scripts/containers.conf (runtime = \"runc\")",
         "podman runs containers with runc; crun fails here (see scripts/containers.conf)"),
)

# Programs the code runs only where something else already put them there.
CONDITIONAL = {
    "systemctl": "setup.sh stops the packaged Prometheus only where systemd runs (/run/systemd/system), "
                 "and there systemd provides systemctl",
}

SHELL_BUILTINS = frozenset("""
    . : [ [[ ]] alias bg break builtin caller cd command compgen complete continue declare dirs disown echo enable
    eval exec exit export false fc fg getopts hash help history jobs kill let local logout mapfile popd printf
    pushd pwd read readarray readonly return set shift shopt source suspend test time times trap true type
    typeset ulimit umask unalias unset wait
""".split())
# Words after which the next word is again a command.
SHELL_COMMAND_PREFIXES = frozenset("if then elif else do while until ! { ( time exec command".split())
SHELL_SEPARATORS = frozenset(";; ; & && | || |& ( ) () { }".split())


# --- Python -----------------------------------------------------------------------------------------------

def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _program_index(argv: list[ast.AST]) -> list[int]:
    """Indexes of argv elements that are programs: the first, and what `ip netns exec NS` or
    `nsenter --net=...` runs."""
    found = [0]
    words = [_const(a) for a in argv]
    if words[:3] == ["ip", "netns", "exec"] and len(argv) > 4:
        found.append(4)
    elif words[:1] == ["nsenter"]:
        i = 1
        while i < len(argv) and (isinstance(argv[i], ast.JoinedStr) or (words[i] or "").startswith("-")):
            i += 1
        if i < len(argv):
            found.append(i)
    return found


def _argv_node(call: ast.Call, assigned: dict[str, ast.AST]) -> ast.AST | None:
    if not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Name) and arg.id in assigned:
        return assigned[arg.id]
    return arg


def _is_subprocess(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr in SUBPROCESS_CALLS and \
        isinstance(f.value, ast.Name) and f.value.id == "subprocess"


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _functions(tree: ast.AST) -> Iterable[tuple[ast.AST, dict[str, ast.AST]]]:
    """Each function (and the module) with its list/tuple assignments (`cmd = [...]` then run(cmd))."""
    scopes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for scope in scopes:
        assigned = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        assigned[t.id] = node.value
        yield scope, assigned


def runners(tree: ast.AST) -> dict[str, tuple[list[ast.AST], bool, int]]:
    """Helpers like `sh(*args)` whose *args become a subprocess argv at a program's place: name -> (the
    argv elements before the *args, whether it is a method, how many positional arguments come first)."""
    defs = [(fn, False) for fn in tree.body if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    defs += [(fn, True) for cls in tree.body if isinstance(cls, ast.ClassDef)
             for fn in cls.body if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = {}
    for fn, method in defs:
        if not fn.args.vararg:
            continue
        var, before = fn.args.vararg.arg, len(fn.args.posonlyargs) + len(fn.args.args) - int(method)
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Call) and _is_subprocess(node) and node.args):
                continue
            argv = node.args[0]
            if isinstance(argv, ast.Name) and argv.id == var:
                found[fn.name] = ([], method, before)
            elif isinstance(argv, (ast.List, ast.Tuple)):
                for i in _program_index(argv.elts):
                    el = argv.elts[i] if i < len(argv.elts) else None
                    if isinstance(el, ast.Starred) and isinstance(el.value, ast.Name) and el.value.id == var:
                        found[fn.name] = (argv.elts[:i], method, before)
    return found


def visible_helpers(tree: ast.AST, everywhere: dict[str, tuple[list[ast.AST], bool, int]]) \
        -> dict[str, tuple[list[ast.AST], int]]:
    """The runner helpers a module's calls can mean: "name" for its own functions and those it imports by
    name (`from lab import sh`), ".name" for methods of any class (called as obj.name("prog", ...))."""
    own = {fn.name for fn in tree.body if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))}
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    seen = {f".{name}": (prefix, before) for name, (prefix, method, before) in everywhere.items() if method}
    seen.update({name: (prefix, before) for name, (prefix, method, before) in everywhere.items()
                 if not method and name in imported and name not in own})
    seen.update({name: (prefix, before) for name, (prefix, method, before) in runners(tree).items()
                 if not method})
    return seen


def python_uses(text: str, where: str, helpers: dict[str, tuple[list[ast.AST], int]]) -> list[Use]:
    tree = ast.parse(text)
    uses: set[Use] = set()
    for scope, assigned in _functions(tree):
        for node in ast.walk(scope):
            if not isinstance(node, ast.Call):
                continue
            at = f"{where}:{node.lineno}"
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "which" and isinstance(f.value, ast.Name) and \
                    f.value.id == "shutil" and node.args and _const(node.args[0]):
                uses.add(Use(_const(node.args[0]), at))
                continue
            argv: list[ast.AST] | None = None
            if _is_subprocess(node):
                target = _argv_node(node, assigned)
                if isinstance(target, (ast.List, ast.Tuple)):
                    argv = target.elts
            elif (key := _name(node) if isinstance(f, ast.Name) else f".{_name(node)}") in helpers:
                prefix, before = helpers[key]
                rest = node.args[before:]
                # Only a literal program names what runs: obj.run(log=log) is some other run.
                if rest and _const(rest[0]):
                    argv = prefix + rest
            if argv:
                for i in _program_index(argv):
                    prog = _const(argv[i]) if i < len(argv) else None
                    if prog and not prog.startswith("-"):
                        uses.add(Use(prog, at))
    return sorted(uses, key=lambda u: (u.where, u.program))


# --- shell ------------------------------------------------------------------------------------------------

def _substitutions(word: str) -> list[str]:
    """The bodies of $(...) in a word, outermost first."""
    out, i = [], 0
    while (start := word.find("$(", i)) >= 0:
        depth, j = 1, start + 2
        while j < len(word) and depth:
            depth += {"(": 1, ")": -1}.get(word[j], 0)
            j += 1
        out.append(word[start + 2:j - 1])
        i = j
    return out


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """Lines with continuations joined, arrays and here-documents skipped (their words are data),
    and a quote left open carried on to the next line."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        i += 1
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i]
            i += 1
        if re.match(r"\s*[A-Za-z_]\w*\+?=\(", line) and ")" not in line:
            while i < len(lines) and ")" not in lines[i]:
                i += 1
            i += 1
            continue
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)", line)
        while True:
            try:
                shlex.split(line, comments=True)
                break
            except ValueError:
                if i >= len(lines):
                    break
                line += "\n" + lines[i]
                i += 1
        yield lineno, line
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1


def shell_commands(text: str, functions: frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, command word) for every simple command, including those in $(...); the script's own
    functions are not programs."""
    found = []
    functions = functions | set(re.findall(r"^\s*(?:function\s+)?([\w-]+)\s*\(\)", text, re.M))
    for lineno, line in _logical_lines(text):
        line = re.sub(r"[A-Za-z_]\w*\+?=\([^)]*\)", " ", line)  # an array's words are data
        line = re.sub(r"\$\(\(.*?\)\)", "0", line)  # arithmetic, not a command
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            words = list(lex)
        except ValueError:
            continue
        at_start, skip_to_separator = True, False
        for word in words:
            for body in _substitutions(word):
                found += [(lineno, w) for _, w in shell_commands(body, functions)]
            if word in SHELL_SEPARATORS or (word and set(word) <= set(";&|")):
                at_start, skip_to_separator = True, False
                continue
            if skip_to_separator or not at_start:
                continue
            if word in ("for", "case", "select", "function"):
                skip_to_separator = True
            elif word in SHELL_COMMAND_PREFIXES or re.match(r"[A-Za-z_]\w*\+?=", word) or set(word) <= set("<>"):
                continue
            else:
                at_start = False
                if word not in SHELL_BUILTINS and word not in functions and word not in ("fi", "done", "esac", "]]") \
                        and not re.search(r"[$`]", word) and not word.startswith("-") \
                        and (word.startswith("/") or "/" not in word):
                    found.append((lineno, word))
    return found


def makefile_shell(text: str) -> str:
    """Recipe lines as shell, make's $(VAR) as a shell variable, one line per line (numbers kept)."""
    out = []
    for line in text.split("\n"):
        if line.startswith("\t"):
            line = re.sub(r"\$\((\w+)\)", r"$\1", line.strip().lstrip("@-"))
            out.append(line)
        else:
            out.append("")
    return "\n".join(out)


# --- the code base ----------------------------------------------------------------------------------------

def repo_uses(root: Path = ROOT) -> list[Use]:
    files = sorted(p for d in PYTHON_DIRS for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)
    trees = {p: p.read_text() for p in files}
    everywhere: dict[str, tuple[list[ast.AST], bool]] = {}
    for text in trees.values():
        everywhere.update(runners(ast.parse(text)))
    uses = []
    for p, text in trees.items():
        uses += python_uses(text, str(p.relative_to(root)), visible_helpers(ast.parse(text), everywhere))
    shells = sorted({p for pattern in SHELL_FILES for p in root.glob(pattern)})
    for p in shells:
        uses += [Use(w, f"{p.relative_to(root)}:{n}") for n, w in shell_commands(p.read_text())]
    if (root / "Makefile").exists():
        uses += [Use(w, f"Makefile:{n}") for n, w in shell_commands(makefile_shell((root / "Makefile").read_text()))]
    return uses


def setup_packages(text: str) -> list[str]:
    """The Debian packages scripts/setup.sh installs: its PKGS array(s)."""
    pkgs = []
    for m in re.finditer(r"^\s*PKGS\+?=\((.*?)\)", text, re.S | re.M):
        body = "\n".join(line.split("#", 1)[0] for line in m.group(1).split("\n"))
        pkgs += [w for w in body.split() if "$" not in w]
    return pkgs


def pip_programs(root: Path = ROOT) -> set[str]:
    """Console scripts of what `pip install -e '.[test]'` installs: the dependency closure from pyproject."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    programs = set(project.get("scripts", {}))
    todo = [(Requirement(r), ()) for r in project.get("dependencies", [])]
    todo += [(Requirement(r), ("test",)) for r in project.get("optional-dependencies", {}).get("test", [])]
    seen: set[str] = set()
    while todo:
        req, _ = todo.pop()
        key = f"{req.name.lower()}{sorted(req.extras)}"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        programs |= {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
        for r in dist.requires or []:
            sub = Requirement(r)
            env = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(e) for e in env):
                todo.append((sub, ()))
    return programs


# --- Debian -----------------------------------------------------------------------------------------------

def _usr_merge(path: str) -> list[str]:
    p = Path(path)
    alts = [path]
    for a, b in (("/bin/", "/usr/bin/"), ("/sbin/", "/usr/sbin/"), ("/lib/", "/usr/lib/")):
        if path.startswith(a):
            alts.append(b + path[len(a):])
        elif path.startswith(b):
            alts.append(a + path[len(b):])
    real = os.path.realpath(p)
    if real != path:
        alts += [a for a in _usr_merge(real) if a not in alts]
    return alts


def dpkg_owners(paths: Iterable[str]) -> dict[str, set[str]]:
    """path -> packages that own it (dpkg -S); absent when no package does."""
    paths = sorted(set(paths))
    if not paths:
        return {}
    out = subprocess.run(["dpkg-query", "-S", *paths], capture_output=True, text=True).stdout
    owners: dict[str, set[str]] = {}
    for line in out.splitlines():
        if line.startswith("diversion ") or ": " not in line:
            continue
        pkgs, path = line.split(": ", 1)
        owners.setdefault(path.strip(), set()).update(p.strip().split(":")[0] for p in pkgs.split(","))
    return owners


def host_providers(programs: Iterable[str]) -> dict[str, tuple[str | None, set[str]]]:
    """program -> (its path here, the Debian packages that provide it) ((None, set()) if not installed)."""
    found: dict[str, tuple[str | None, list[str]]] = {}
    for prog in programs:
        if any(c in prog for c in "*?["):
            paths = sorted(glob.glob(prog))
        elif prog.startswith("/"):
            paths = [prog] if os.path.exists(prog) else []
        else:
            which = shutil.which(prog, path=SEARCH_PATH)
            paths = [which] if which else []
        found[prog] = (paths[0] if paths else None, [a for p in paths for a in _usr_merge(p)])
    owners = dpkg_owners(a for _, alts in found.values() for a in alts)
    return {prog: (path, {pkg for a in alts for pkg in owners.get(a, ())}) for prog, (path, alts) in found.items()}


def is_static(path: str) -> bool:
    """An ELF file with no program interpreter (PT_INTERP) needs no ld.so."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = int.from_bytes(head[32:40], "little")
        phentsize, phnum = int.from_bytes(head[54:56], "little"), int.from_bytes(head[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i * phentsize:i * phentsize + 4], "little") != 3 for i in range(phnum))


def mirror() -> str:
    """The Debian mirror apt uses here (as scripts/image.sh finds it)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", Path(path).read_text(), re.M)
        if m and "security" not in m.group(1):
            return m.group(1)
    if os.path.exists("/etc/apt/sources.list"):
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", Path("/etc/apt/sources.list").read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return sorted((m for m in points if m == str(path) or m.startswith(f"{path}/")), reverse=True)


def fresh_rootfs(log: Callable[[str], None] = print) -> Path:
    """A minbase Debian 12 root filesystem from the mirror apt uses, made once and kept in FRESH_CACHE.

    Made in a scratch directory and renamed into place when complete, so a failed or concurrent run
    never leaves a half-made root that a later run would trust."""
    url = mirror()
    target = FRESH_CACHE / f"{SUITE}-minbase"
    stamp = target / ".shaper-complete"
    if stamp.exists() and stamp.read_text().strip() == url:
        return target
    FRESH_CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=FRESH_CACHE))
    log(f"fresh machine: debootstrap --variant=minbase {SUITE} from {url} (about a minute, once)")
    try:
        proc = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(work / "root"), url],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"debootstrap --variant=minbase {SUITE} {url} failed ({proc.returncode}):\n{tail}")
        (work / "root" / ".shaper-complete").write_text(url + "\n")
        # Another run may have finished first: keep its root (it may be reading it) and drop ours.
        if not (stamp.exists() and stamp.read_text().strip() == url):
            if target.exists():
                _remove(target)
            os.rename(work / "root", target)
    finally:
        _remove(work)
    return target


def _remove(path: Path) -> None:
    # debootstrap mounts /proc and /sys in the target; a failed run may leave them mounted, and
    # deleting through a mount would reach the host's files.
    for m in _mounts_under(path):
        subprocess.run(["umount", "-l", m], check=False)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def installed(rootfs: Path) -> set[str]:
    """Packages installed in a root filesystem (its dpkg status)."""
    pkgs, name = set(), None
    for line in (rootfs / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1].strip()
        elif line.startswith("Status: ") and line.split()[-1] == "installed" and name:
            pkgs.add(name)
    return pkgs


def setup_closure(rootfs: Path, pkgs: list[str]) -> set[str]:
    """What `apt-get install --no-install-recommends PKGS` (setup's command) would add to that root: apt's
    simulation against the root's dpkg status, with this machine's sources and package lists."""
    proc = subprocess.run(["apt-get", "install", "-s", "-q", "--no-install-recommends",
                           "-o", f"Dir::State::status={rootfs / 'var/lib/dpkg/status'}", *pkgs],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get install -s of setup's packages failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    return {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("Inst ")}


def unknown_packages(pkgs: list[str]) -> list[str]:
    """Packages that apt has no candidate for (not in the configured bookworm sources)."""
    out = subprocess.run(["apt-cache", "policy", *pkgs], capture_output=True, text=True,
                         env={**os.environ, "LC_ALL": "C"}).stdout
    candidates = dict(re.findall(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: (\S+)", out, re.M))
    return [p for p in pkgs if candidates.get(p, "(none)") == "(none)"]


# --- the check --------------------------------------------------------------------------------------------

@dataclass
class Report:
    programs: dict[str, list[str]] = field(default_factory=dict)  # program -> where
    problems: list[str] = field(default_factory=list)
    satisfied: dict[str, str] = field(default_factory=dict)  # program -> how


def check(uses: list[Use], needs: Iterable[Need], providers: Callable[[list[str]], dict],
          pip: set[str], fresh: set[str], added: set[str], static: Callable[[str], bool] = is_static,
          conditional: dict[str, str] = CONDITIONAL) -> Report:
    """Every program used or needed must come from pip (.venv), the fresh root or what setup adds."""
    report = Report()
    needs = list(needs)
    for u in uses:
        report.programs.setdefault(u.program, []).append(u.where)
    for n in needs:
        report.programs.setdefault(n.program, []).append(f"{n.where} ({n.why})")
    wanted = {n.program: n for n in needs}
    have = fresh | added
    lookup = providers(sorted(p for p in report.programs if p not in pip and os.path.basename(p) not in pip))
    for prog, where in sorted(report.programs.items()):
        at = ", ".join(sorted(set(where))[:4]) + (f" and {len(set(where)) - 4} more" if len(set(where)) > 4 else "")
        if prog in pip or os.path.basename(prog) in pip:
            report.satisfied[prog] = "pip (.venv)"
            continue
        if prog in conditional:
            report.satisfied[prog] = f"conditional: {conditional[prog]}"
            continue
        need = wanted.get(prog)
        path, pkgs = lookup.get(prog, (None, set()))
        if need and need.package:
            pkgs = {need.package}
        if not pkgs:
            report.problems.append(
                f"{prog} (run by {at}) is not installed here after setup, and no Debian package here provides "
                f"it: add the package that does to PKGS in scripts/setup.sh")
            continue
        if not pkgs & have:
            report.problems.append(
                f"{prog} (run by {at}) comes from Debian package {' or '.join(sorted(pkgs))}"
                f"{f' (here: {path})' if path else ''}, which neither a minbase {SUITE} nor scripts/setup.sh "
                f"installs: add {sorted(pkgs)[0]} to PKGS in scripts/setup.sh")
            continue
        if need and need.static:
            if not path or not static(path):
                report.problems.append(f"{prog} (needed by {at}) must be statically linked; "
                                       f"{path or 'none'} here is not (package {sorted(pkgs)[0]})")
                continue
        how = sorted(pkgs & have)[0]
        report.satisfied[prog] = f"{how} ({'minbase' if how in fresh else 'setup'})"
    return report


def run_check(log: Callable[[str], None] = print) -> tuple[Report, dict]:
    """The whole check on this machine: (report, figures for the record)."""
    pkgs = setup_packages((ROOT / "scripts/setup.sh").read_text())
    rootfs = fresh_rootfs(log)
    fresh = installed(rootfs)
    added = setup_closure(rootfs, pkgs)
    report = check(repo_uses(), INDIRECT, host_providers, pip_programs(), fresh, added)
    return report, {"rootfs": str(rootfs), "minbase_packages": len(fresh), "setup_adds": len(added),
                    "setup_list": len(pkgs), "programs": len(report.programs)}


if __name__ == "__main__":
    report, figures = run_check(lambda s: print(s, file=sys.stderr))
    for prog, how in sorted(report.satisfied.items()):
        print(f"ok       {prog:24} {how}")
    for p in report.problems:
        print(f"MISSING  {p}")
    print(figures)
    sys.exit(1 if report.problems else 0)
