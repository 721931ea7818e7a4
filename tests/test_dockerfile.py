"""The Dockerfile, without a Docker engine: its shape is checked, then its own install and start commands
run in a fresh virtual environment, and the gateway it starts must answer its HEALTHCHECK with SERVING.

What is emulated, and how:
- The image's paths map into tmp_path (/opt/venv, /src, /data, the Numba cache dir).
- COPY copies the named paths from the repository, so a file the image would lack is lacking here too.
- `python -m venv` and `pip install` run as written (the venv keeps the old setuptools it is born with,
  as the image's does), so pip builds the project in an isolated environment with the build backend
  pyproject.toml's `[build-system] requires` names (setuptools>=77), fetched from the package index as
  `docker build` would; the test asserts that it did and that the wheel's generator satisfies that
  requirement. Nothing this machine or the test's environment happens to have can stand in for it.
- The new venv is given, by a `.pth` file, the site directories of the environment running this test:
  the runtime dependencies pinned in pyproject.toml resolve from what `pip install -e ".[dev]"` put
  there, offline and fast, instead of being downloaded again (`--system-site-packages` would not do:
  from a venv it reaches the base interpreter's site-packages, whatever the machine has there). The
  `.pth` lists paths only, so those directories' own `.pth` files (the editable checkout's among them)
  are not run, and the project itself is built and installed fresh from the copy.
- RUN lines of the runtime stage before USER are the root-only system setup (user, directories): the
  directories are made here. RUN lines after USER (the warm-up) run as written.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.gateway.gatewaykit import Credentials

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """The instructions of each `FROM … AS name` stage."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in instructions(text):
        if word == "FROM":
            name = rest.split()[-1] if " as " in rest.lower() else str(len(out))
            current = out[name] = []
        elif current is not None:
            current.append((word, rest))
    return out


def exec_form(rest: str) -> list[str]:
    """A JSON exec-form argument list (CMD ["a", "b"]); the image must not use the shell form there."""
    import json

    assert rest.startswith("["), f"shell form is not allowed here: {rest}"
    return json.loads(rest)


def env_pairs(rest: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(rest))


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    s = stages(text)
    assert list(s) == ["builder", "runtime"], "a builder stage, then a slim runtime stage"
    assert "-slim" in text
    runtime = s["runtime"]
    words = [w for w, _ in runtime]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime, "the runtime gets the venv only"
    assert not any(w == "RUN" and "pip install" in r for w, r in runtime), "nothing is built at runtime"
    users = [r for w, r in runtime if w == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the gateway runs as a non-root user"
    env = {k: v for w, r in runtime if w == "ENV" for k, v in env_pairs(r).items()}
    assert env.get("NUMBA_CACHE_DIR"), "a writable Numba cache dir"
    warm = words.index("RUN", words.index("USER"))
    assert "bandgate warm" in runtime[warm][1], "the cache is warmed as the runtime user"
    assert any(w == "VOLUME" and "/data" in r for w, r in runtime)
    (health,) = [r for w, r in runtime if w == "HEALTHCHECK"]
    probe = exec_form(health.partition("CMD")[2].strip())
    assert probe == ["bandgate", "health", "--target", "127.0.0.1:50050"]
    (cmd,) = [r for w, r in runtime if w == "CMD"]
    argv = exec_form(cmd)
    assert argv[:2] == ["bandgate", "serve"] and "--insecure" not in argv, "the image serves TLS"
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert flags == {
        "--listen": "0.0.0.0:50051",  # mutual TLS, published
        "--token-listen": "0.0.0.0:50052",  # bearer tokens over TLS, published
        "--health-listen": "127.0.0.1:50050",  # plaintext health for the HEALTHCHECK, container loopback only
        "--store": "sqlite:////data/bandgate.db",
    }
    (exposed,) = [r.split() for w, r in runtime if w == "EXPOSE"]
    assert sorted(exposed) == ["50051", "50052"], "health is not published"
    assert env.get("BANDGATE_STATE_DIR", "").startswith("/data/"), "keys and CA live on the volume"
    assert env.get("BANDGATE_TOKEN_PROCESS") == "true", "token callers in a process of their own"


class Image:
    """The Dockerfile's commands with the image's paths mapped into `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.paths = {
            "/opt/venv": root / "venv",
            "/src": root / "src",
            "/data": root / "data",
        }
        self.env: dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NUMBA_", "BANDGATE_"))
        }
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"
        self.workdir = root

    def map(self, text: str) -> str:
        # longest first, so /opt/venv/bin maps inside /opt/venv; the cache dir maps when ENV names it
        for image_path, local in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w.]){re.escape(image_path)}(?=[/\s:\"']|$)", str(local), text)
        return text

    def apply_env(self, rest: str) -> None:
        for key, value in env_pairs(rest).items():
            if key == "NUMBA_CACHE_DIR":
                self.paths[value] = self.root / "numba-cache"
            value = self.map(value).replace("$PATH", self.env["PATH"])
            self.env[key] = value

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        command = self.map(command)
        venv = re.search(r"python -m venv (\S+)", command)
        if venv:
            command = command.replace(venv.group(0), f"{shlex.quote(sys.executable)} -m venv {venv.group(1)}")
        done = subprocess.run(
            ["bash", "-ec", command],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"RUN {command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        if venv:
            lend_dependencies(Path(venv.group(1)))
        return done

    def copy(self, rest: str) -> None:
        *sources, dest = shlex.split(rest)
        assert not any(s.startswith("--") for s in sources), "COPY --from only in the runtime stage"
        target = Path(self.map(dest)) if dest.startswith("/") else self.workdir / dest
        for source in sources:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(  # a directory's contents go to dest, as COPY does
                    src,
                    target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"),
                    dirs_exist_ok=True,
                )
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)


def lend_dependencies(venv: Path) -> None:
    """Let `venv` import what this test's environment has installed, after its own packages."""
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (own,) = venv.glob("lib/python*/site-packages")
    (own / "_test_dependencies.pth").write_text("".join(f"{d}\n" for d in dirs if os.path.isdir(d)))


def build_backend(venv: Path) -> tuple[str, Requirement]:
    """The setuptools version that built the installed project, and the one pyproject.toml requires."""
    (wheel,) = venv.glob("lib/python*/site-packages/bandgate-*.dist-info/WHEEL")
    # setuptools >= 70.1 writes its own bdist_wheel and names itself; older ones left it to `wheel`
    built_by = re.search(r"^Generator: setuptools \((.+)\)$", wheel.read_text(), re.M)
    assert built_by, f"not built by a setuptools that writes its own wheels:\n{wheel.read_text()}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    (required,) = [r for r in map(Requirement, requires) if r.name == "setuptools"]
    return built_by.group(1), required


def build(image: Image) -> None:
    s = stages(DOCKERFILE.read_text())
    for word, rest in s["builder"]:
        if word == "ENV":
            image.apply_env(rest)
        elif word == "WORKDIR":
            image.workdir = Path(image.map(rest))
            image.workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            image.copy(rest)
        elif word == "RUN":
            done = image.run(rest, timeout=600)
            if "pip install" in rest:  # the build backend came from pyproject.toml, not from this machine
                assert "Installing build dependencies" in done.stdout, f"not isolated:\n{done.stdout[-3000:]}"
    # the runtime stage: the builder's venv stays where it is (COPY --from keeps the path)
    user = False
    for word, rest in s["runtime"]:
        if word == "ENV":
            image.apply_env(rest)
            cache = image.env.get("NUMBA_CACHE_DIR")
            if cache:
                Path(cache).mkdir(parents=True, exist_ok=True)
        elif word == "USER":
            user = True
        elif word == "WORKDIR":
            image.workdir = Path(image.map(rest))
            image.workdir.mkdir(parents=True, exist_ok=True)
        elif word == "RUN" and user:
            image.run(rest, timeout=600)


def cache_files(image: Image) -> set[str]:
    return {p.name for p in Path(image.env["NUMBA_CACHE_DIR"]).rglob("*") if p.is_file()}


def wait_for_address(log: Path, proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The TLS and health addresses of the gateway's "serving" log line, or with serving processes under a
    supervisor (the token process) the supervisor's: its processes' lines name their `process`."""
    deadline = time.monotonic() + timeout
    serving = r'"event":"(?:supervisor_)?serving".*?"address":"([^"]+)".*?"health_address":"([^"]+)"'
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            m = re.search(serving, line)
            if m and '"process":' not in line:
                return m.group(1), m.group(2)
        time.sleep(0.05)
    raise AssertionError(f"serve did not start: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_image_commands_install_warm_serve_and_report_serving(tmp_path: Path) -> None:
    image = Image(tmp_path)
    build(image)
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    venv = image.paths["/opt/venv"]

    # the project came from the copy, not from the editable checkout on this machine
    where = image.run('python -c "import decoder, gateway; print(decoder.__file__, gateway.__file__)"', 60)
    assert all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where.stdout
    # ... and was built by the setuptools pyproject.toml asks for, whatever this machine has installed
    built_by, required = build_backend(venv)
    assert required.specifier.contains(built_by), f"built by setuptools {built_by}, needs {required}"
    warmed = cache_files(image)
    assert any(name.endswith(".nbc") for name in warmed), "warm-up left no compiled kernels"

    (cmd,) = [r for w, r in runtime if w == "CMD"]
    ports = {"0.0.0.0:50051": "127.0.0.1:0", "0.0.0.0:50052": "127.0.0.1:0", "127.0.0.1:50050": "127.0.0.1:0"}
    argv = [ports.get(a, image.map(a)) for a in exec_form(cmd)]
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=image.workdir, env=image.env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        address, health_address = wait_for_address(log, proc, 60)
        (health,) = [r for w, r in runtime if w == "HEALTHCHECK"]
        probe = exec_form(health.partition("CMD")[2].strip())
        check = [a.replace("127.0.0.1:50050", health_address) for a in probe]
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(check, env=image.env, capture_output=True, text=True, timeout=30)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        assert done.returncode == 0 and done.stdout.strip() == "SERVING", (done.stdout, done.stderr)

        # a band's batches are stored with the kernels the warm-up compiled: nothing new in the cache
        import grpc

        from gateway.privacy.client import give_consent
        from gateway.simulator.client import run_fleet
        from gateway.simulator.recorder import fleet_batches

        fleet = [(r.device_id, b) for r, b in fleet_batches(bands=1, minutes=20, seed=3, batch_minutes=10)]
        # the first start put its CA and the operator credential in the state dir on the volume
        state = Path(image.env["BANDGATE_STATE_DIR"])
        assert state.is_relative_to(image.paths["/data"]), state
        assert (state / "ca.key").stat().st_mode & 0o777 == 0o600

        async def upload() -> list:
            creds = await Credentials(state, address).fleet_credentials([d for d, _ in fleet])
            for device_id, band_creds in creds.items():  # the owner's first use: an adult profile, consent
                async with grpc.aio.secure_channel(address, band_creds) as ch:
                    await give_consent(ch, device_id)
            return await run_fleet(address, fleet, give_up_after_s=30, credentials=creds)

        (stats,) = asyncio.run(asyncio.wait_for(upload(), 60))
        assert stats.stored == len(fleet[0][1]) and not stats.refused
        assert cache_files(image) == warmed, "serve compiled kernels the warm-up missed"
        assert (image.paths["/data"] / "bandgate.db").exists()
        print(f"ready in {ready_s:.2f} s with the warm cache")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    failed = subprocess.run(check, env=image.env, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0, "health must fail once the gateway is gone"
