"""Issue 15's bad-input matrix: every mistake a new user makes is caught before anything starts — through the CLI,
exit code 2, exactly one error line naming the file, line or record, column or key, nothing written under a fresh
ROADS_HOME (no state folder, no Prefect home or server, no MLflow store, no record), in a few seconds.

Each case writes a tiny study file (``study.yaml`` in tmp_path) whose task reads the bad file, and runs
``flows.cli.main`` in this process; one test runs cases as a subprocess to see the real exit code and that neither
Prefect nor MLflow was imported."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 15  # loose: the preflight itself takes milliseconds; importing transformers or datasets takes seconds
GOOD = [{"prompt": f"Question {i}?", "chosen": f" answer {i}", "rejected": f" no {i}"} for i in range(12)]


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """Overrides tests/flows/conftest.py's test server: nothing in this file may need one."""
    yield


def jsonl(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_study(tmp: Path, source: str | None = None, fmt: str = "auto", limit: int | None = None) -> Path:
    """A study file with a synthetic pipeline ``default`` (no report), ``reported`` (a report, no measure_gap) and, with
    ``source``, a real-data pipeline ``real`` reading it and a sweep ``grid`` over it."""
    tasks: dict = {"gap": {"family": "gap"}}
    pipelines: dict = {
        "default": {"tasks": ["gap"], "seeds": [0], "stages": ["prepare_data", "sft"]},
        "reported": {"tasks": ["gap"], "seeds": [0], "stages": ["prepare_data", "sft", "evaluate", "report"]},
    }
    doc: dict = {"tasks": tasks, "pipelines": pipelines}
    if source is not None:
        tasks["prefs"] = {"family": "preferences", "source": source, "format": fmt, **({"limit": limit} if limit else {})}
        pipelines["real"] = {"tasks": ["prefs"], "seeds": [0], "stages": ["prepare_data", "sft"]}
        doc["sweeps"] = {"grid": {"pipeline": "real", "runner": "process", "grid": {"sft.lr": [0.001, 0.002]}}}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def data_case(name: str, content: bytes, fmt: str = "auto", limit: int | None = None):
    """A case whose data file ``name`` holds ``content``; ``roads run real``."""
    def setup(tmp: Path, monkeypatch) -> list[str]:
        (tmp / name).write_bytes(content)
        return ["run", "real", "--file", str(write_study(tmp, str(tmp / name), fmt, limit))]
    return setup


def gz_cut() -> bytes:
    data = gzip.compress(jsonl(GOOD * 20))
    return data[: len(data) // 2]


def gz_damaged() -> bytes:
    data = bytearray(gzip.compress(jsonl(GOOD * 20)))
    for i in range(20, 40):  # inside the deflate stream, after the 10-byte header
        data[i] ^= 0xFF
    return bytes(data)


def run_case(argv_of):
    def setup(tmp: Path, monkeypatch) -> list[str]:
        return argv_of(tmp, monkeypatch)
    return setup


def folder_source(tmp, monkeypatch):
    (tmp / "data").mkdir()
    (tmp / "data" / "a.jsonl").write_bytes(jsonl(GOOD))
    return ["run", "real", "--file", str(write_study(tmp, str(tmp / "data")))]


def hub_dataset(tmp, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ["run", "real", "--file", str(write_study(tmp, "nosuch-org/nosuch-dataset"))]


def pretrained(make):
    def setup(tmp, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return ["run", "--file", str(write_study(tmp)), "--set", f"model.pretrained={make(tmp)}"]
    return setup


def missing_model(tmp):
    return str(tmp / "no-such-model")


def empty_model(tmp):
    (tmp / "model").mkdir()
    return str(tmp / "model")


def broken_model(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{not json")
    (tmp / "model" / "model.safetensors").write_bytes(b"")
    return str(tmp / "model")


def hub_model(tmp):
    return "nosuch-org/nosuch-model"


def home_is_file(tmp, monkeypatch):
    (tmp / "home").write_text("")
    return ["run", "--file", str(write_study(tmp))]


def home_under_file(tmp, monkeypatch):
    (tmp / "afile").write_text("")
    monkeypatch.setenv("ROADS_HOME", str(tmp / "afile" / "home"))
    return ["run", "--file", str(write_study(tmp))]


def unwritable_system_folder() -> str | None:
    """A folder even root cannot create files in (/proc, /sys), or None."""
    for folder in ("/proc", "/sys"):
        try:
            handle, probe = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(handle)
        os.unlink(probe)
    return None


def home_file_for(*argv: str):
    """``roads server`` / ``ui`` / ``deploy`` with a ROADS_HOME that is a file (they need no study)."""
    def setup(tmp, monkeypatch):
        (tmp / "home").write_text("")
        return list(argv)
    return setup


def home_read_only_mount(tmp, monkeypatch):
    folder = unwritable_system_folder()
    if folder is None:
        pytest.skip("no folder here refuses writes (/proc and /sys are writable)")
    monkeypatch.setenv("ROADS_HOME", f"{folder}/roads-test-home")
    return ["run", "--file", str(write_study(tmp))]


def home_read_only_folder(tmp, monkeypatch):
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    try:
        (tmp / "ro" / "probe").write_text("")
    except OSError:
        pass
    else:
        (tmp / "ro" / "probe").unlink()
        (tmp / "ro").chmod(0o700)
        pytest.skip("running as root: chmod 0o500 does not stop writes (the /proc case covers a refusing folder)")
    monkeypatch.setenv("ROADS_HOME", str(tmp / "ro" / "home"))
    return ["run", "--file", str(write_study(tmp))]


def disk_full(tmp, monkeypatch):
    import flows.preflight

    monkeypatch.setattr(flows.preflight, "free_bytes", lambda folder: 3 * 2**20)
    return ["run", "--file", str(write_study(tmp))]


def cli(*args: str):
    return lambda tmp, monkeypatch: [args[0], *args[1:], "--file", str(write_study(tmp))]


def sweep_bad_line(tmp, monkeypatch):
    (tmp / "prefs.jsonl").write_bytes(jsonl(GOOD[:2]) + b"{oops\n" + jsonl(GOOD[2:]))
    return ["sweep", "grid", "--file", str(write_study(tmp, str(tmp / "prefs.jsonl")))]


MISSING_REJECTED = jsonl(GOOD[:2] + [{"prompt": "Q?", "chosen": " a"}] + GOOD[2:])
NOT_UTF8 = jsonl(GOOD[:1]) + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n' + jsonl(GOOD[1:])
INT_TEXT = jsonl(GOOD[:1] + [{"prompt": "Q?", "chosen": 7, "rejected": " b"}] + GOOD[1:])
SAME = jsonl([{**r, "rejected": r["chosen"]} for r in GOOD])

# id -> (setup(tmp, monkeypatch) -> argv, what the one error line must say)
CASES = {
    "missing-rejected": (data_case("prefs.jsonl", MISSING_REJECTED), ["prefs.jsonl", "record 3", "'rejected'"]),
    "empty-file": (data_case("prefs.jsonl", b""), ["prefs.jsonl", "no records"]),
    "blank-lines-only": (data_case("prefs.jsonl", b"\n\n  \n"), ["prefs.jsonl", "no records"]),
    "bad-json-line": (data_case("prefs.jsonl", jsonl(GOOD[:3]) + b'{"prompt": "x", oops}\n' + jsonl(GOOD[3:])),
                      ["prefs.jsonl", "line 4", "not valid JSON"]),
    "truncated-gz": (data_case("prefs.jsonl.gz", gz_cut()), ["prefs.jsonl.gz", "ended early after line", ".gz"]),
    "damaged-gz": (data_case("prefs.jsonl.gz", gz_damaged()), ["prefs.jsonl.gz", "damaged compressed data"]),
    "not-gzip": (data_case("prefs.jsonl.gz", jsonl(GOOD)), ["prefs.jsonl.gz", "Not a gzipped file"]),
    "not-utf8": (data_case("prefs.jsonl", NOT_UTF8), ["prefs.jsonl", "line 2", "not UTF-8", "0xe9"]),
    "not-utf8-bom16": (data_case("prefs.jsonl", b"\xff\xfe" + "x".encode("utf-16-le")), ["prefs.jsonl", "line 1",
                                                                                        "not UTF-8"]),
    "int-for-text": (data_case("prefs.jsonl", INT_TEXT), ["prefs.jsonl", "record 2", "'chosen'", "int, not text"]),
    "csv-file": (data_case("prefs.csv", b"prompt,chosen,rejected\n"), ["prefs.csv", "unsupported file type"]),
    "folder-source": (run_case(folder_source), ["data", "is a directory", "a.jsonl"]),
    "missing-source": (lambda tmp, mp: ["run", "real", "--file", str(write_study(tmp, str(tmp / "nope.jsonl")))],
                       ["tasks.prefs.source", "nope.jsonl"]),
    "hub-dataset-offline": (run_case(hub_dataset), ["nosuch-org/nosuch-dataset", "offline", "local"]),
    "chosen-equals-rejected": (data_case("prefs.jsonl", SAME), ["tasks.prefs", "prefs.jsonl", "same as rejected"]),
    "one-prompt-after-limit": (data_case("prefs.jsonl", jsonl(GOOD), limit=1),
                               ["tasks.prefs", "1 distinct prompt", "tasks.prefs.limit"]),
    "pretrained-missing": (pretrained(missing_model), ["model.pretrained", "no-such-model", "no folder"]),
    "pretrained-empty": (pretrained(empty_model), ["model.pretrained", "model", "empty folder"]),
    "pretrained-broken-config": (pretrained(broken_model), ["model.pretrained", "config does not load"]),
    "pretrained-hub-offline": (pretrained(hub_model), ["model.pretrained", "nosuch-org/nosuch-model",
                                                        "HF_HUB_OFFLINE=1 is set", "local folder"]),
    "home-is-a-file": (run_case(home_is_file), ["ROADS_HOME=", "home", "is a file, not a folder"]),
    "home-under-a-file": (run_case(home_under_file), ["ROADS_HOME=", "afile", "is a file"]),
    "home-read-only-mount": (run_case(home_read_only_mount), ["ROADS_HOME=", "roads-test-home", "cannot create a file"]),
    "home-read-only-folder": (run_case(home_read_only_folder), ["ROADS_HOME=", "cannot create a file"]),
    "server-home-is-a-file": (home_file_for("server"), ["ROADS_HOME=", "is a file, not a folder"]),
    "ui-home-is-a-file": (home_file_for("ui"), ["ROADS_HOME=", "is a file, not a folder"]),
    "deploy-home-is-a-file": (home_file_for("deploy", "default"), ["ROADS_HOME=", "is a file, not a folder"]),
    "disk-full": (run_case(disk_full), ["ROADS_HOME=", "3 MB free", "writes about"]),
    "stage-unknown": (cli("stage", "nosuchstage"), ["no stage 'nosuchstage'", "prepare_data, sft"]),
    "stage-force-unknown": (cli("stage", "nosuchstage", "--force", "--pipeline", "reported"),
                            ["'reported'", "no stage 'nosuchstage'"]),
    "report-without-report-stage": (cli("report", "default"), ["'default'", "no report stage"]),
    "report-gap-without-measure-gap": (cli("report", "reported", "--gap"), ["'reported'", "measure_gap"]),
    "bad-set-key": (cli("run", "--set", "sft.epoch=3"), ["--set sft.epoch=3", "defaults.sft.epoch", "unknown key"]),
    "bad-set-value": (cli("run", "--set", "sft.lr=fast"), ["--set sft.lr=fast", "defaults.sft.lr"]),
    "unknown-pipeline": (cli("run", "nosuch"), ["unknown pipeline 'nosuch'"]),
    "sweep-bad-line": (run_case(sweep_bad_line), ["sweeps.grid", "point", "prefs.jsonl", "line 3"]),
    "sweep-unnamed": (cli("sweep"), ["name a sweep"]),
}

WRITTEN = ("artifacts", "results", "mlflow.db", "mlruns", "prefect", "logs")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh ROADS_HOME that must stay absent, with Prefect's home and MLflow's store inside it (so that anything
    either wrote would show there); run from the project root."""
    monkeypatch.chdir(ROOT)
    home = tmp_path / "home"
    monkeypatch.setenv("ROADS_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(home / "prefect"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    from flows import env

    def configure():  # a case the preflight let through fails here, instead of starting a study
        raise AssertionError("the state folder was about to be created: the preflight let this input through")

    monkeypatch.setattr(env, "configure", configure)
    return tmp_path


def nothing_written(tmp: Path, before: dict[str, bytes | None]) -> None:
    home = Path(os.environ["ROADS_HOME"])
    if home.is_relative_to(tmp):  # a file that was there stays as it was; a folder that was not is not created
        if str(home) in before:
            assert home.is_file() and home.read_bytes() == before[str(home)]
        else:
            assert not home.exists(), f"{home} was created: {sorted(p.name for p in home.iterdir())}"
        assert not any(tmp.rglob(".roads-preflight-*")), "the writability probe was left behind"
    else:
        assert not home.exists()
    # Prefect's home and MLflow's store were pointed inside ROADS_HOME: neither was created
    for name in WRITTEN:
        assert not (tmp / "home" / name).exists(), f"{name} was written"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_anything_starts(case, fresh, monkeypatch, capsys):
    setup, says = CASES[case]
    argv = setup(fresh, monkeypatch)
    home = Path(os.environ["ROADS_HOME"])
    before = {str(home): home.read_bytes()} if home.is_file() else {}
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("roads: error: "), err
    for part in says:
        assert part in lines[0], f"{part!r} not in: {lines[0]}"
    assert "set HF_HUB_OFFLINE=1" not in lines[0] or "HF_HUB_OFFLINE" not in os.environ, lines[0]
    assert not out.strip() or out.startswith("pipeline: default"), out  # roads stage names the pipeline it used
    assert elapsed < SECONDS, f"{case} took {elapsed:.1f} s"
    nothing_written(fresh, before)


SUBPROCESS = ["bad-json-line", "truncated-gz", "stage-unknown", "report-without-report-stage", "home-under-a-file"]


def test_as_a_new_user_runs_it_exit_2_one_line_no_prefect_no_mlflow(fresh, monkeypatch):
    """The real process: the exit code is the error's (not swallowed), stderr is one line, and the command ends
    before Prefect or MLflow is even imported."""
    probe = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
             "sys.stdout.write(repr(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))); sys.exit(code)")
    for case in SUBPROCESS:
        tmp = fresh / case
        tmp.mkdir()
        monkeypatch.setenv("ROADS_HOME", str(tmp / "home"))
        argv = CASES[case][0](tmp, monkeypatch)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=dict(os.environ))
        elapsed = time.perf_counter() - start
        assert proc.returncode == 2, (case, proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("roads: error: "), (case, proc.stderr)
        assert proc.stdout.splitlines()[-1] == "[]", (case, proc.stdout)
        assert elapsed < SECONDS, f"{case} took {elapsed:.1f} s"
        nothing_written(tmp, {})


def test_the_preflight_passes_good_inputs_and_writes_nothing(fresh, monkeypatch, shared_data):
    """The same checks pass the real HH-RLHF file, a saved model folder (its config and tokenizer load) and a fresh
    home, creating nothing."""
    from flows.preflight import preflight
    from roads.config import load_study

    hh = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not hh.exists():
        pytest.skip(f"no {hh}")
    study = load_study(write_study(fresh, str(hh), "hh-rlhf", 50), "real")
    report = preflight(study)
    assert report["sources"] == [str(hh)] and report["stages"] == 2 and report["estimate_bytes"] < report["free_bytes"]
    assert report["seconds"] < SECONDS
    from roads.models import build_tokenizer, new_causal_lm

    tokenizer = build_tokenizer(["a b c d e f"] * 4, vocab_size=300)
    new_causal_lm("tiny", tokenizer, seed=0).save_pretrained(fresh / "model")
    tokenizer.save_pretrained(fresh / "model")
    study = load_study(write_study(fresh), "default", [f"model.pretrained={fresh / 'model'}"])
    report = preflight(study)
    assert report["models"] == [str(fresh / "model")] and report["stages"] == 2
    assert not Path(os.environ["ROADS_HOME"]).exists()
