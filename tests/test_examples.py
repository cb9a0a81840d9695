"""Every example in README.md and docs/*.md runs as written: the fenced blocks are taken out of the
pages and run, page by page, against a corem server the test starts, with libcoap's real clients.

The conventions a page follows (docs/development.md, "Examples are tested", says them to writers):

- ```` ```sh ```` is a block a reader pastes into a shell: it is run (bash, `set -eo pipefail`) and
  must end with status 0; a CoAP error answer it prints (`4.01 …`, `5.03 …`) fails it unless its
  output block shows that answer.  Words after `sh` in the info string say more:
  `server` -- it starts a server in the foreground, in a terminal of its own (`make run`, `corem
  serve …`): the test runs it in the background and waits until `/readyz` answers 200; the running
  server is stopped first (SIGINT, the reader's Ctrl-C). `background` -- it keeps running (an
  observer): the test starts it, goes on, and stops it at the page's end. `stopped` -- the reader
  stopped the server first: the test does too. `needs=WHAT` -- it needs what the test cannot give
  (`kafka`, `postgres`, `root`, `install`): skipped, and the skip says why.
- ```` ```python server ```` is a program that serves (your own resources): run like a server block.
- ```` ```text output ```` right after a runnable block is what the reader sees: each of its lines
  must be a line of what that block printed (a server block: its log until it is ready), in order,
  where `…` stands for any text, and timestamps, IPv4 addresses, and coap-client's message IDs and
  tokens may differ.  Any other ```` ```text ```` block is shown, not checked.
- A block whose first line is `# examples/NAME` is that file whole: the test holds the two equal.

What the test substitutes, so that the pages can say the defaults a reader has: each page runs in a
temporary directory of its own holding links to the checkout's `.venv` and `examples` (so `data` is
the page's own data dir); the ports 5683, 5684 and 8080 (after a `:`) become free ports the test
picked (free for UDP and TCP alike), and a server gets them as COREM_COAP, COREM_COAPS and
COREM_HTTP (on 127.0.0.1); `make run` is `.venv/bin/corem serve`, what the Makefile's rule runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .ports import free_port, group_holds

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NEEDS_LIBCOAP = shutil.which("coap-client-notls") is None or shutil.which("coap-client-openssl") is None
BLOCK_TIMEOUT = 120.0  # (a failure detector: a block may start servers and clients on a busy machine)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    words: set[str]
    text: str
    needs: str | None = None
    output: Block | None = None  # its `text output` block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang == "sh" or (self.lang == "python" and "server" in self.words)


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found: list[Block] = []
    for m in FENCE.finditer(text):
        lang, *words = m[1].split() or [""]
        needs = next((w.split("=", 1)[1] for w in words if w.startswith("needs=")), None)
        b = Block(page, text.count("\n", 0, m.start()) + 1, lang, set(words), m[2], needs)
        if lang == "text" and "output" in words:
            assert found and found[-1].runnable and found[-1].output is None, \
                f"{b.where}: an output block follows the block whose output it shows"
            found[-1].output = b
        found.append(b)
    return found


# -- what every page must hold to (no server needed) -----------------------------------------------
def test_the_readme_is_short_and_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_make_run_is_what_the_test_runs_for_it():
    """The pages say `make run`; the test runs `.venv/bin/corem serve`: the Makefile's rule must be that."""
    assert re.search(r"^run: .*\n\t\$\(VENV\)/bin/corem serve$", (ROOT / "Makefile").read_text(), re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_pages_speak_to_users_and_their_links_resolve(page):
    text = page.read_text()
    for word in (r"\bissue \d+", r"\bspecs? 00\d", r"\b(first|second|third|fourth|fifth|sixth) session",
                 r"\bsession'?s run\b", r"\bin the same session\b"):
        assert not re.search(word, text, re.I), f"{page.name}: internal word {re.search(word, text, re.I)[0]!r}"
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = page.parent / target if target else page
        assert path.exists(), f"{page.name}: link to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name}: link to {target}#{anchor}, a heading that does not exist"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to '-')."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_one_form_of_each_command(page):
    """`.venv/bin/corem`, never a bare `corem` (outside a service's install); `coap-client-notls` or
    `-openssl`, never the bare `coap-client`; 127.0.0.1 with its port written out."""
    for b in blocks(page):
        if b.lang != "sh" or b.needs in ("root", "install"):
            continue
        code = re.sub(r"#.*", "", b.text)
        assert not re.search(r"(^|[|;&(]\s*|\$\(|\s)corem\s", code, re.M), f"{b.where}: a bare `corem` command"
        assert not re.search(r"\bcoap-client\s", code), f"{b.where}: the bare coap-client (say -notls or -openssl)"
        assert not re.search(r"://(localhost|host)\b", code), f"{b.where}: use 127.0.0.1"
        assert not re.search(r"127\.0\.0\.1(?!:\d)", code), f"{b.where}: 127.0.0.1 without its port"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_example_files_are_the_blocks_that_show_them(page):
    for b in blocks(page):
        first = b.text.splitlines()[0] if b.text else ""
        if m := re.fullmatch(r"(?:#|//) (examples/\S+)", first):
            path = ROOT / m[1]
            assert path.exists(), f"{b.where}: {m[1]} does not exist"
            assert path.read_text() == b.text, f"{b.where}: the block and {m[1]} differ"


# -- running them ----------------------------------------------------------------------------------
class PortTaken(Exception):
    """A port picked for the page was taken by another process before its server bound it: the
    page runs again on new ports (pytest-xdist runs other tests' servers meanwhile)."""


@dataclass
class Run:
    """One page's run: its directory, ports, environment, server and background blocks."""

    work: Path
    ports: dict[str, int]
    env: dict[str, str]
    server: subprocess.Popen | None = None
    server_log: Path | None = None
    background: list[tuple[Block, subprocess.Popen, Path]] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        for default, port in self.ports.items():
            text = re.sub(rf"(?<=:){default}\b", str(port), text)
        return re.sub(r"^make run\b", ".venv/bin/corem serve", text, flags=re.M)

    def start(self, b: Block, log: Path) -> subprocess.Popen:
        if b.lang == "python":
            program = self.work / f"block-{b.line}.py"
            program.write_text(self.substitute(b.text))
            args = [str(self.work / ".venv/bin/python"), str(program)]
        else:
            args = ["bash", "-eo", "pipefail", "-c", self.substitute(b.text)]
        return subprocess.Popen(args, cwd=self.work, env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_server(self, b: Block) -> None:
        self.stop_server()
        self.server_log = self.work / f"server-{b.line}.log"
        self.server = self.start(b, self.server_log)
        url = f"http://127.0.0.1:{self.ports['8080']}/readyz"
        deadline = time.monotonic() + 60
        while True:  # (a failure detector, not a timing assumption: ready is what is waited on)
            if self.server.poll() is not None:
                log = self.server_log.read_text()
                if "cannot listen on" in log:  # one of the ports picked was taken before the server bound it
                    raise PortTaken(log[-500:])
                raise AssertionError(f"{b.where}: the server exited: {log[-3000:]}")
            holds = group_holds(self.ports["8080"], self.server.pid)
            if holds is False:  # another process listens on the port picked: not this page's server
                raise PortTaken(f"{self.ports['8080']} is another process's")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200 and holds:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"{b.where}: not ready in 60 s: {self.server_log.read_text()[-3000:]}"
            time.sleep(0.1)
        check_output(b, self.server_log.read_text(), self)

    def stop_server(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        os.killpg(server.pid, signal.SIGINT)  # the reader's Ctrl-C
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise AssertionError("the server did not stop at SIGINT within 30 s") from None
        assert code == 0, f"the server exited with {code}: {self.server_log.read_text()[-3000:] if self.server_log else ''}"

    def kill_all(self) -> None:
        for p in [self.server] + [p for _, p, _ in self.background]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"), "<time>"),
    (re.compile(r"\b\d{1,3}(\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"\bi:[0-9a-f]{1,4}\b"), "i:<mid>"),
    (re.compile(r"\{[0-9a-f]*\}"), "{<token>}"),
    (re.compile(r" ?Uri-Port:\d+,"), ""),  # (libcoap names a port that is not the default: the test's are not)
]


def masked(line: str) -> str:
    for pattern, repl in MASKS:
        line = pattern.sub(repl, line)
    return line.rstrip()


def check_output(b: Block, got: str, run: Run) -> None:
    """What the block printed holds its output block's lines, in order; no CoAP error it does not show."""
    want = run.substitute(b.output.text) if b.output else ""
    for code in re.findall(r"^([45]\.\d\d)\b", got, re.M):
        assert code in want, f"{b.where}: answered {code}:\n{got[-3000:]}"
    lines = [masked(line) for line in got.splitlines()]
    at = 0
    for expected in filter(None, (masked(line) for line in want.splitlines())):
        pattern = re.compile(".*".join(map(re.escape, expected.split("…"))) + "$")
        while at < len(lines) and not pattern.match(lines[at]):
            at += 1
        assert at < len(lines), f"{b.where}: {expected!r} is not in what it printed (in order):\n{got[-3000:]}"
        at += 1


def run_block(b: Block, run: Run) -> None:
    r = subprocess.run(["bash", "-eo", "pipefail", "-c", run.substitute(b.text)], cwd=run.work, env=run.env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=BLOCK_TIMEOUT)
    got = r.stdout.decode(errors="replace")
    assert r.returncode == 0, f"{b.where}: status {r.returncode}:\n{b.text}\n---\n{got[-3000:]}"
    check_output(b, got, run)


RUNNABLE = [p for p in PAGES if any(b.runnable for b in blocks(p))]


@pytest.mark.skipif(NEEDS_LIBCOAP, reason="libcoap's clients (Debian libcoap3-bin) are not installed")
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
def test_the_examples_run(page, tmp_path):
    for attempt in range(3):
        try:
            skipped = run_page(page, tmp_path / f"work-{attempt}")
        except PortTaken:
            if attempt == 2:
                raise
            continue
        if skipped:
            print("skipped:", *skipped, sep="\n  ")
        return


def run_page(page: Path, work: Path) -> list[str]:
    """Every runnable block of the page, in order, in `work`; the blocks that need what is not here."""
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "examples").symlink_to(ROOT / "examples")
    ports = {"5683": free_port(socket.SOCK_DGRAM, socket.SOCK_STREAM),
             "5684": free_port(socket.SOCK_DGRAM, socket.SOCK_STREAM), "8080": free_port(socket.SOCK_STREAM)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("COREM_") or k == "COREM_PURE_PYTHON"}
    env.update(COREM_COAP=f"127.0.0.1:{ports['5683']}", COREM_COAPS=f"127.0.0.1:{ports['5684']}",
               COREM_HTTP=f"127.0.0.1:{ports['8080']}")
    run = Run(work, ports, env)
    skipped: list[str] = []
    try:
        for b in blocks(page):
            if not b.runnable:
                continue
            if b.needs:
                skipped.append(f"{b.where} needs {b.needs}")
                continue
            if "stopped" in b.words:
                run.stop_server()
            if "server" in b.words:
                run.start_server(b)
            elif "background" in b.words:
                log = work / f"background-{b.line}.log"
                run.background.append((b, run.start(b, log), log))
            else:
                run_block(b, run)
        for b, p, log in run.background:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(timeout=30)
            check_output(b, log.read_text(errors="replace"), run)
        run.stop_server()
    finally:
        run.kill_all()
    return skipped
