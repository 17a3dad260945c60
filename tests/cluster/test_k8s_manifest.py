"""pipelines/k8s/precompute-job.yaml: the Indexed Job's settings, and its command line run as pods would.

No Kubernetes runs here. The first test reads the manifest with PyYAML and checks what the
multi-worker contract relies on. The second runs the Job's own `command` + `args` with the real
binary, once per index with JOB_COMPLETION_INDEX set as Kubernetes sets it, on local folders instead
of the s3:// URLs and with 2 partitions instead of 64, and checks that `status` sees every partition
done and `finalize` + `verify` pass.

A full schema check (strict, Kubernetes 1.28 to 1.37) is in pipelines/k8s/README.md: it needs the
`kubernetes-validate` package, which the test environment does not install.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from vp_helpers import REPO, require

MANIFEST = REPO / "pipelines" / "k8s" / "precompute-job.yaml"


def _docs() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(require(MANIFEST, "Kubernetes manifest").read_text()) if d]
    return {d["kind"]: d for d in docs}


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from the Job's args: {args}"
    return args[args.index(flag) + 1]


def test_indexed_job_settings():
    docs = _docs()
    job = docs["Job"]
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["podReplacementPolicy"] == "Failed", "a replacement pod must not overlap the old one"
    assert spec["backoffLimitPerIndex"] >= 1 and "backoffLimit" not in spec
    assert 0 <= spec["maxFailedIndexes"] <= spec["completions"]
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "backoffLimitPerIndex and podFailurePolicy need Never"
    (c,) = pod["containers"]
    assert c["command"] == ["vae-pipeline"], "exec form: vae-pipeline is PID 1 and gets SIGTERM itself"
    args = c["args"]
    assert args[0] == "precompute"
    assert "--partition" not in args, "the partition comes from JOB_COMPLETION_INDEX"
    assert int(_arg(args, "--partitions")) == spec["completions"], "--partitions must equal completions"
    assert _arg(args, "--input").startswith("s3://") and _arg(args, "--out").startswith("s3://")
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    env = {e["name"]: e for e in c["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "vae-pipeline-s3" and not ref.get("optional"), (name, ref)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    pipeline = Path(_arg(args, "--pipeline"))
    volume = mounts[str(pipeline.parent)]
    (cm_volume,) = [v for v in pod["volumes"] if v["name"] == volume]
    cm = docs["ConfigMap"]
    assert cm_volume["configMap"]["name"] == cm["metadata"]["name"]
    assert pipeline.name in cm["data"], "the ConfigMap holds the pipeline TOML the args name"
    assert pod["terminationGracePeriodSeconds"] >= 30, "time to commit after SIGTERM"


def test_configmap_and_readme_plan_agree():
    """The README plans with `--pipeline pipelines/...toml` and the same URLs and count as the Job:
    the ConfigMap's preset must be that file's settings, or every pod is refused by the plan."""
    import shlex
    import tomllib

    readme = (MANIFEST.parent / "README.md").read_text()
    start = readme.index("vae-pipeline plan ")
    command = shlex.split(readme[start:readme.index("\n", readme.index("--partitions", start))].replace("\\\n", " "),
                          comments=True)
    preset = REPO / _arg(command, "--pipeline")
    docs = _docs()
    configmap = tomllib.loads(docs["ConfigMap"]["data"]["pipeline.toml"])
    assert configmap == tomllib.loads(preset.read_text()), f"the ConfigMap differs from {preset}"
    (c,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    for flag in ("--input", "--out", "--partitions"):
        assert _arg(command, flag) == _arg(c["args"], flag), f"{flag}: README's plan and the Job differ"


def test_job_command_line_with_completion_indexes(binary, cards, shared, tmp_path):
    """The Job's args, with local folders and 2 partitions, run once per JOB_COMPLETION_INDEX."""
    kodak = require(shared / "data" / "kodak", "Kodak images")
    job = _docs()["Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    args = list(c["args"])
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(f'model = "{cards["avgpool8"]}"\nsize = 256\ndtype = "f32"\nthreads = 1\n')
    inp = tmp_path / "in"
    inp.mkdir()
    for png in sorted(kodak.glob("*.png")):
        (inp / png.name).symlink_to(png)
    out = tmp_path / "out"
    replace = {"--pipeline": str(pipeline), "--input": str(inp), "--out": str(out), "--partitions": "2"}
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION_INDEX", "RANK",
                                                                    "WORLD_SIZE"))}
    for index in range(2):
        p = subprocess.run([str(binary), *args], env={**env, "JOB_COMPLETION_INDEX": str(index)},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"index {index}: exit {p.returncode}\n{p.stderr[-4000:]}"
    st = subprocess.run([str(binary), "status", str(out), "--json"], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["partitions"] == 2 and sorted(status["done"]) == [0, 1] and not status["missing"], status
    for cmd in (["finalize", str(out)], ["verify", str(out)]):
        p = subprocess.run([str(binary), *cmd], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stderr[-4000:]}"
    if not (out / "_SUCCESS").exists():
        pytest.fail(f"finalize wrote no _SUCCESS in {out}", pytrace=False)
