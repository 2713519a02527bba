"""How long ComfyUI's event loop is held by Consent Guard's prompt gate (nodes/prompt_guard.py
on_prompt) for large submissions, with the real engine (lexicon + classifier) and a real audit
log, under the ComfyUI stand-ins of tests/comfy_standins.py.

    .venv/bin/python bench/prompt_gate.py [--nodes 3000]

Prints the wall time of one on_prompt call and the number of audit lines it wrote, for:
ComfyUI's default txt2img workflow (the everyday case), as many distinct texts as one
submission may hold (MAX_TEXTS: the longest the event loop is held), 3000
PrimitiveStringMultiline nodes with distinct benign texts (refused: over the bound), and the
same 3000 with one text."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import comfy_standins  # noqa: E402
from _pytest.monkeypatch import MonkeyPatch  # noqa: E402

WORDS = ("castle dragon river forest light cloud mountain portrait rain city night lamp "
         "harbour boat garden bridge winter market").split()


def texts(n: int, distinct: bool):
    for i in range(n):
        j = i if distinct else 0
        yield " ".join(WORDS[(j * 7 + k * 3) % len(WORDS)] for k in range(10)) + f" {j}"


def primitives(n: int, distinct: bool) -> dict:
    prompt = {str(i + 100): {"class_type": "PrimitiveStringMultiline", "inputs": {"value": t}}
              for i, t in enumerate(texts(n, distinct))}
    prompt.update(txt2img())
    return prompt


def txt2img() -> dict:
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {
            "text": "beautiful scenery nature glass bottle landscape", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark",
                                                         "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI",
                                                    "images": ["8", 0]}},
    }


def audit_lines(home: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in home.rglob("audit.log*")
               if p.is_file() and not p.name.endswith(".lock"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3000)
    args = ap.parse_args()
    mp = MonkeyPatch()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        mp.setenv("CONSENT_GUARD_HOME", str(home))
        pkg = comfy_standins.install(mp, Path(tmp) / "comfy")
        guard = sys.modules[pkg.__name__ + ".nodes.prompt_guard"]
        guard.on_prompt({"prompt": txt2img()})  # load the engine and its models once
        most = guard.MAX_TEXTS - 2  # with the txt2img positive and checkpoint name
        cases = [("default txt2img", txt2img()),
                 (f"{most} primitives, distinct (the most allowed)", primitives(most, True)),
                 (f"{args.nodes} primitives, distinct texts", primitives(args.nodes, True)),
                 (f"{args.nodes} primitives, one text", primitives(args.nodes, False))]
        for name, prompt in cases:
            before = audit_lines(home)
            start = time.perf_counter()
            out = guard.on_prompt({"prompt": prompt, "client_id": "bench"})
            took = time.perf_counter() - start
            refused = out["prompt"] is not prompt
            print(f"{name:48s} {took:8.3f} s  audit lines +{audit_lines(home) - before:<5d}"
                  f" {'refused' if refused else 'queued'}")
    mp.undo()


if __name__ == "__main__":
    main()
