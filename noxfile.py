"""Sessions: `nox -s tests` (full install), `nox -s tests_minimal` (core dependencies only), `nox -s demo`
(the main job: train the demo model on QM9), `nox -s bench` (quick benchmark run), `nox -s tests_torch_scatter`
(builds the optional torch-scatter accelerator from source, ~7 minutes, then runs its parity tests).

torch is installed first and pinned in every later install, so no dependency can pull a different (CUDA) build.
"""
import nox

TORCH = "torch==2.13.0"
nox.options.sessions = ["tests", "tests_minimal"]
nox.options.reuse_existing_virtualenvs = True


def _install(session, extras=None):
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".", TORCH)


@nox.session(python="3.11")
def tests(session):
    """Every test, with all optional extras (RDKit, qm9pack, matplotlib, se3-transformer-pytorch) and triton (its
    kernels run in Triton's interpreter on CPU) installed."""
    _install(session, "all,triton")
    session.run("pytest", *(session.posargs or ["-q"]), env={"SE3T_REQUIRE": "rdkit,qm9,peers,triton"})


@nox.session(python="3.11")
def tests_minimal(session):
    """The core on a minimal install: torch, e3nn, numpy, ase and pytest only."""
    _install(session, "test")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python="3.11")
def tests_torch_scatter(session):
    """The optional torch-scatter backend: builds it against the pinned torch, then checks parity."""
    _install(session, "all")
    session.install("--no-build-isolation", "torch-scatter", TORCH)
    session.run("pytest", "-q", "-m", "torch_scatter", "tests", env={"SE3T_REQUIRE": "torch_scatter"})


@nox.session(python="3.11")
def demo(session):
    """The main job: train the demo model on real QM9 (a few minutes on 2 CPU cores)."""
    _install(session, "all")
    session.run("se3t", "train", "--preset", "demo", *session.posargs)


@nox.session(python="3.11")
def bench(session):
    """A quick benchmark run (results in benchmarks/results/quick)."""
    _install(session, "all")
    session.run("python", "-m", "benchmarks", "all", "--quick", "--out", "benchmarks/results/quick", *session.posargs)
