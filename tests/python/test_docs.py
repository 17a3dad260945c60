"""The guides are tests: README.md and docs/*.md run as written.

- Every ```console block runs, in page order, in one sandbox per page: `photos/` (four Kodak
  photos with captions), `data/0000N.tar` and `train.parquet` (the same photos, written by Python's
  tarfile and pyarrow), `clips/` (two H.264 pans over Kodak photos, made by Debian's `ffmpeg`), this repository's `pipelines/`, `docs/*.py` and cards with the shared ONNX
  files in `models/onnx/` (as `make models` leaves them), `.venv` (this Python), `../shared`, and
  the binary on the PATH. Each
  `$ ` line (with its `\\` continuations) runs in bash; the lines under it are its expected output
  (stdout and stderr together, without the timed `progress:` lines): `[..]` matches any text
  within a line, a `...` line any lines; a `? N` line expects exit code N instead of 0.
- S3 is moto_server on loopback, its `AWS_*` environment set: bucket `data` holds the tars
  under `shards/`, bucket `latents` is empty.
- Real VAE weights are not here. The sandbox holds stand-ins that are real checkpoints of the
  published families' configs, only tiny and random: diffusers folders under the names the guides
  use (`sdxl-vae-fp16-fix/`, `sd-vae-ft-mse/`, `FLUX.2-dev/vae/`, …; Qwen-Image and Wan 2.2 are the
  shared family checkpoints), and their exports in `$VAE_PIPELINE_MODELS` for the shipped cards.
  They are written with safetensors in diffusers' naming and exported by the binary itself.
- A block preceded by `<!-- needs: WHAT; tested by: FILE::TEST -->` is not run here (a GPU, a
  cluster, a bucket, a full-size download); the named test must exist. A ```python block preceded
  by `<!-- run: python -->` runs in the page's sandbox after the console blocks before it.
- Relative links and their anchors resolve; every subcommand's `--help` flags are the flags of
  the guides' tables tagged `<!-- flags: SUBCOMMAND … -->`; every flag a guide names exists.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clips
from vp_helpers import REPO, moto_server, require, s3_env

sys.path.insert(0, str(REPO / "benches" / "gpu"))
import vae_checkpoint  # noqa: E402  (the GPU bench's checkpoint writer, shared with these stand-ins)

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*PAGES, REPO / "FORMAT.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "pipelines").glob("*/README.md"))]
PHOTOS = {"kodim01": "a red door in a brick wall", "kodim02": "a red hat", "kodim03": "hats",
          "kodim04": "a girl in a red hat"}

# Flags of other programs that the guides name: each with the program it belongs to.
FOREIGN_FLAGS = {
    "--cache_latents_to_disk": "kohya sd-scripts", "--max_bucket_reso": "kohya sd-scripts",
    "--keep_cache": "musubi-tuner", "--signal": "sbatch", "--array": "sbatch", "--parsable": "sbatch",
    "--dependency": "sbatch", "--requeue": "sbatch", "--for": "kubectl", "--timeout": "kubectl",
    "--address": "pipelines/ray/launch.py", "--bin": "pipelines/ray/launch.py",
    "--num-gpus": "pipelines/ray/launch.py", "--no-deps": "pip", "--local-dir": "hf download",
    "--release": "cargo", "--bench": "cargo", "--rss": "benches/compare.sh",
    "--clips": "benches/video_bench.py, benches/musubi_wan_check.py", "--rounds": "benches/video_bench.py",
    "--work": "benches/video_bench.py", "--musubi": "benches/musubi_wan_check.py",
    "--cache": "benches/musubi_wan_check.py",
    "--profile": "aws configure", "--format": "aws configure", "--enable_bucket": "kohya sd-scripts",
    "--min_bucket_reso": "kohya sd-scripts", "--bucket_reso_steps": "kohya sd-scripts",
    "--bucket_no_upscale": "kohya sd-scripts",
}

# ------------------------------------------------------------------------------ the pages

@dataclass
class Block:
    page: Path
    line: int
    info: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)


def blocks(page: Path) -> list[Block]:
    """Fenced blocks of a page, each with the `<!-- key: value; key: value -->` line above it."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = lines[start - 1].strip() if start else ""
        marks = {}
        if above.startswith("<!--") and above.endswith("-->"):
            for part in above[4:-3].split(";"):
                key, _, value = part.partition(":")
                marks[key.strip()] = value.strip()
        out.append(Block(page, start + 1, m.group(1), "\n".join(body), marks))
        i += 1
    return out


def prose(page: Path) -> str:
    """A page without its fenced blocks."""
    return re.sub(r"^```.*?^```\s*$", "", page.read_text(), flags=re.S | re.M)


@dataclass
class Command:
    line: str
    expected: list[str]
    code: int = 0


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            out.append(Command(cmd, []))
        elif out and re.fullmatch(r"\? \d+", line):
            out[-1].code = int(line[2:])
        elif out:
            out[-1].expected.append(line)
        else:
            raise AssertionError(f"{block.page.name}:{block.line}: a console block starts with a `$ ` line")
        i += 1
    return out


def matches(expected: list[str], output: str) -> bool:
    """Whether `output` fits `expected`. The `progress:` lines a long run prints every 10 s depend
    on the machine's speed, so they are left out of `output` first."""
    output = "".join(line for line in output.splitlines(keepends=True) if not line.startswith("progress: "))
    pattern = ""
    for line in expected:
        if line == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += r"[^\n]*?".join(map(re.escape, line.split("[..]"))) + r"\n"
    text = output if output.endswith("\n") or not output else output + "\n"
    return re.fullmatch(pattern, text, flags=re.S) is not None


# ---------------------------------------------------------------------- the stand-in VAEs

def kl_checkpoint(folder: Path, latent: int, scaling: float, shift: float | None, quant: bool,
                  seed: int, flux2: bool = False) -> Path:
    """A diffusers AutoencoderKL folder (config.json + safetensors) of the published layout with
    four 4-channel blocks (factor 8, as the real VAEs) and random weights, written by the GPU
    bench's checkpoint writer. Its mid blocks have no attention (`mid_block_add_attention` off):
    at 1/8 of a 1024² bucket that attention's matrix alone is about 1 GB per image, and these
    runs must take seconds."""
    config = {
        **vae_checkpoint.BASE, "_class_name": "AutoencoderKLFlux2" if flux2 else "AutoencoderKL",
        "block_out_channels": [4, 4, 4, 4], "layers_per_block": 1, "norm_num_groups": 4,
        "latent_channels": latent, "sample_size": 64, "scaling_factor": scaling,
        "shift_factor": shift, "mid_block_add_attention": False, "use_quant_conv": quant,
        "use_post_quant_conv": quant,
    }
    if flux2:
        config.update({"batch_norm_eps": 1e-4, "patch_size": [2, 2]})
    return vae_checkpoint.write(config, folder, seed)


# name in the guides -> (latent channels, scaling, shift, quant_conv, FLUX.2, shipped card it serves)
STAND_INS = {
    "sd-vae-ft-mse": (4, 0.18215, None, True, False, "sd15"),
    "sdxl-vae-fp16-fix": (4, 0.13025, None, True, False, "sdxl"),
    "stable-diffusion-3-medium-diffusers/vae": (16, 1.5305, 0.0609, False, False, "sd3"),
    "FLUX.1-dev/vae": (16, 0.3611, 0.1159, False, False, "flux1"),
    "FLUX.2-dev/vae": (32, 1.0, 0.0, True, True, None),
}
FAMILY_LINKS = {"Qwen-Image/vae": "qwen-image", "Wan2.2-TI2V-5B-Diffusers/vae": "wan2.2",
                "Wan2.1-T2V-1.3B-Diffusers/vae": "wan2.1"}
# clips/: pans over Kodak photos (name -> frames, caption), 192x128 H.264 at 16 fps.
PANS = {"kodim01": (17, "a red door"), "kodim03": (9, "hats")}


@dataclass
class Sandbox:
    root: Path
    template: Path
    shared: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto_server: buckets `data` (the sandbox's tars under `shards/`) and `latents` (empty)."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def sandbox(binary, shared, s3_endpoint, tmp_path_factory) -> Sandbox:
    import boto3

    root = tmp_path_factory.mktemp("docs")
    (root / "bin").mkdir()
    (root / "bin" / "vae-pipeline").symlink_to(binary.resolve())
    t = root / "template"
    photos = t / "photos"
    photos.mkdir(parents=True)
    for name, caption in PHOTOS.items():
        shutil.copy(require(shared / "data" / "kodak" / f"{name}.png", "Kodak photo"), photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(caption)
    (t / "data").mkdir()
    names = list(PHOTOS)
    for n, part in enumerate((names[:2], names[2:])):
        with tarfile.open(t / "data" / f"{n:05d}.tar", "w") as tar:
            for name in part:
                for ext, data in (("png", (photos / f"{name}.png").read_bytes()), ("txt", PHOTOS[name].encode())):
                    info = tarfile.TarInfo(f"{name}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "key": names,
        "image": pa.array([{"bytes": (photos / f"{n}.png").read_bytes(), "path": f"{n}.png"} for n in names], image),
        "text": [PHOTOS[n] for n in names],
    }), t / "train.parquet")
    (t / "clips").mkdir()
    for name, (n, caption) in PANS.items():
        with Image.open(photos / f"{name}.png") as im:
            rgb = np.asarray(im.convert("RGB"))
        clips.h264_mp4(t / "clips" / f"{name}_pan.mp4", np.stack([rgb[2 * i:2 * i + 128, 3 * i:3 * i + 192] for i in range(n)]))
        (t / "clips" / f"{name}_pan.txt").write_text(caption)
    shutil.copytree(REPO / "pipelines", t / "pipelines")
    (t / "docs").mkdir()
    for script in (REPO / "docs").glob("*.py"):
        shutil.copy(script, t / "docs")
    (t / ".venv").symlink_to(Path(sys.prefix))
    (t / "models" / "onnx").mkdir(parents=True)
    for card in (REPO / "models").glob("*.toml"):
        shutil.copy(card, t / "models")
    for onnx in (shared / "models").glob("*.onnx"):
        (t / "models" / "onnx" / onnx.name).symlink_to(onnx)
    weights = root / "weights"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_env(s3_endpoint))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    for bucket in ("data", "latents"):
        client.create_bucket(Bucket=bucket)
    for tar in sorted((t / "data").glob("*.tar")):
        client.upload_file(str(tar), "data", f"shards/{tar.name}")
    env.update({
        "PATH": f"{root / 'bin'}:{env['PATH']}", "VAE_PIPELINE_MODELS": str(weights),
        "XDG_CONFIG_HOME": str(root / "xdg"), "PYTHONPATH": str(REPO / "python"),
    })
    for seed, (name, (latent, scaling, shift, quant, flux2, card)) in enumerate(STAND_INS.items()):
        folder = kl_checkpoint(t / name, latent, scaling, shift, quant, seed, flux2)
        if card:
            r = subprocess.run([str(binary), "export", "--checkpoint", str(folder), "--out",
                                str(weights / "onnx" / card)], capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, f"export of the {card} stand-in: {r.stderr}"
    for name, family in FAMILY_LINKS.items():
        folder = t / name
        folder.mkdir(parents=True)
        src = require(shared / "models" / "families" / family, f"{family} family checkpoint")
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            (folder / f).symlink_to(src / f)
    return Sandbox(root, t, shared, env)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


# ---------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("page", [p for p in PAGES if any(b.info in ("console", "python") for b in blocks(p))],
                         ids=page_id)
def test_guide_commands_run_as_written(page, sandbox):
    work = sandbox.root / page.stem / "work"
    shutil.copytree(sandbox.template, work, symlinks=True)
    (work.parent / "shared").symlink_to(sandbox.shared.resolve())
    for block in blocks(page):
        where = f"{page_id(page)}:{block.line}"
        if "needs" in block.marks:
            continue
        if block.info == "python" and block.marks.get("run") == "python":
            r = subprocess.run([sys.executable, "-c", block.text], cwd=work, env=sandbox.env,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"{where}: the Python block failed:\n{r.stdout}{r.stderr}"
            continue
        if block.info != "console":
            continue
        for cmd in commands(block):
            r = subprocess.run(["bash", "-c", cmd.line], cwd=work, env=sandbox.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=300)
            assert r.returncode == cmd.code, f"{where}: `{cmd.line}` exited {r.returncode}, not {cmd.code}:\n{r.stdout}"
            assert matches(cmd.expected, r.stdout), (
                f"{where}: `{cmd.line}` printed\n{r.stdout}\nwhich does not match\n" + "\n".join(cmd.expected))


def test_blocks_not_run_here_name_the_test_that_runs_them():
    for page in PAGES:
        for block in blocks(page):
            where = f"{page_id(page)}:{block.line}"
            if block.info in ("", "sh", "bash", "shell"):
                assert "vae-pipeline " not in block.text, (
                    f"{where}: vae-pipeline commands belong in a ```console block (run by this test) "
                    "or one marked <!-- needs: …; tested by: … -->")
            if "needs" not in block.marks:
                continue
            assert block.info == "console", f"{where}: only console blocks are marked `needs`"
            target = block.marks.get("tested by", "")
            assert target, f"{where}: a `needs` mark says `tested by: FILE::TEST`"
            path, _, test = target.partition("::")
            source = require(REPO / path, f"{where}: the file its mark names").read_text()
            assert not test or re.search(rf"^def {re.escape(test)}\(", source, flags=re.M), (
                f"{where}: {path} has no test named {test}")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page).splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_relative_links_and_anchors_resolve():
    dead = []
    for page in LINKED:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                dead.append(f"{page_id(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                dead.append(f"{page_id(page)}: {target} (no heading #{anchor} in {dest.name})")
    assert not dead, "dead links:\n" + "\n".join(dead)


def help_flags(binary: Path) -> dict[str, set[str]]:
    top = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=True).stdout
    subs = re.findall(r"^  ([a-z][a-z-]*)  ", top.split("Commands:")[1].split("Options:")[0], flags=re.M)
    out = {}
    for sub in subs:
        if sub == "help":
            continue
        text = subprocess.run([str(binary), sub, "--help"], capture_output=True, text=True, check=True).stdout
        out[sub] = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, flags=re.M)) - {"--help", "--version"}
    return out


def table_flags() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("| flag |"):
                m = re.fullmatch(r"<!-- flags: ([a-z -]+) -->", lines[i - 1].strip())
                assert m, f"{page_id(page)}:{i + 1}: a flag table is tagged <!-- flags: SUBCOMMAND … -->"
                rows = []
                for row in lines[i + 2:]:
                    if not row.startswith("|"):
                        break
                    rows.append(row.split("|")[1])
                flags = set(re.findall(r"`(--[a-z0-9-]+)", " ".join(rows))) | set(
                    re.findall(r"`, `(--[a-z0-9-]+)`", " ".join(rows)))
                for sub in m.group(1).split():
                    out.setdefault(sub, set()).update(flags)
    return out


def test_help_and_the_flag_tables_agree(binary):
    helps, tables = help_flags(binary), table_flags()
    problems = []
    for sub, flags in helps.items():
        for flag in sorted(flags - tables.get(sub, set())):
            problems.append(f"`{sub} {flag}` is in --help but in no guide's flag table")
        for flag in sorted(tables.get(sub, set()) - flags):
            problems.append(f"`{sub} {flag}` is in a guide's flag table but not in --help")
    for sub in sorted(set(tables) - set(helps)):
        problems.append(f"a flag table is tagged `{sub}`, which is not a subcommand")
    readme = (REPO / "README.md").read_text()
    for sub in sorted(helps):
        if f"| `{sub}` |" not in readme:
            problems.append(f"`{sub}` is missing from README.md's subcommand table")
    assert not problems, "\n".join(problems)


def test_every_flag_the_guides_name_exists(binary):
    helps = help_flags(binary)
    known = set().union(*helps.values(), {"--help", "--version"})
    unknown = []
    for page in PAGES:
        text = page.read_text()
        # Commands: each vae-pipeline subcommand's own flags.
        for sub, rest in re.findall(r"(?:vae-pipeline|\$BIN) ([a-z][a-z-]*)((?:[^\n`]|\\\n)*)", text):
            if sub not in helps:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])", rest.split(" -- ")[0]):
                if flag not in helps[sub] and flag not in FOREIGN_FLAGS:
                    unknown.append(f"{page_id(page)}: `vae-pipeline {sub} {flag}`")
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text):
            if flag not in known and flag not in FOREIGN_FLAGS:
                unknown.append(f"{page_id(page)}: {flag}")
    assert not unknown, "flags the guides name that do not exist:\n" + "\n".join(sorted(set(unknown)))
