"""A joint run's small state, to commit under `safechat/train/candidates/` and resume in a later sitting (issue 35).

`checkpoint.pt` (joint.py) holds everything a resume needs in float32 next to the run's data: the prepared
prompts and the base model's own continuations, harmful ones included, which may not be committed, and a cache
of lower-layer states of several hundred MB. The state written here holds only what training learned and where
it stands:

    state.safetensors   LoRA factors (float16), [CLS] row and head (float32), and the optimizer's moments
                        (bfloat16: the second moments underflow in float16) when they stay under MOMENTS_MAX_MB
    state.json          step, schedule, configuration (the data's digest, the seeds), loss history, and the
                        command to resume it

A later sitting runs the same `safechat train joint` command with `--resume`: the data stages regenerate from
the seeds (greedy generation, the same thread count), the digest in the configuration must match what they
produce (a mismatch is refused), and training continues from this state. LoRA factors rounded to float16 and
moments to bfloat16 move the continued run off the uninterrupted one by rounding noise only; without the
moments, Adam restarts its averages (its bias correction makes the first steps sign-sized, as at any start).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
MOMENTS_MAX_MB = 4.0


def resume_command(argv: list[str] | None) -> str | None:
    """The `safechat train ...` command that continues a run in a later sitting (kept in state.json)."""
    if argv is None:
        return None
    return shlex.join(["safechat", "train", *argv, *([] if "--resume" in argv else ["--resume"])])


def moments_mb(opt_state: dict) -> float:
    """Size of the optimizer's moments in bfloat16."""
    return sum(2 * v.numel() for s in opt_state["state"].values() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq")) / 2 ** 20


def has_state(state_dir: Path | None) -> bool:
    return state_dir is not None and (Path(state_dir) / STATE_JSON).is_file()


def save_state(state_dir: Path, ckpt: dict, command: str | None = None,
               moments_max_mb: float = MOMENTS_MAX_MB) -> None:
    """Write the small state of a checkpoint dict (joint.py's layout) into state_dir."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{k}": v.detach().to(torch.float16).contiguous() for k, v in ckpt["lora"].items()}
    tensors["cls_row"] = ckpt["cls_row"].detach().float().contiguous()
    tensors["head"] = ckpt["head"].detach().float().contiguous()
    opt = ckpt["opt"]
    keep = moments_mb(opt) <= moments_max_mb
    steps = {}
    for i, s in opt["state"].items():
        steps[str(i)] = float(s["step"]) if "step" in s else 0.0
        if keep:
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"opt.{i}.{k}"] = s[k].detach().to(torch.bfloat16).contiguous()
    meta = {"step": ckpt["step"], "config": ckpt["config"], "history": ckpt["history"], "sched": ckpt["sched"],
            "param_groups": opt["param_groups"], "opt_steps": steps, "moments": keep,
            "moments_mb": round(moments_mb(opt), 2), "command": command}
    for name, blob in ((STATE_TENSORS, None), (STATE_JSON, json.dumps(meta, indent=1, sort_keys=True) + "\n")):
        tmp = state_dir / (name + ".tmp")
        if blob is None:
            save_file(tensors, str(tmp))
        else:
            tmp.write_text(blob)
        tmp.replace(state_dir / name)


def resume_from(ckpt: Path, state_dir: Path | None) -> tuple[dict | None, Path]:
    """What a resumed run continues from, and its path: the out dir's checkpoint.pt when there is one, else the
    small state in state_dir, else nothing (a fresh start)."""
    if ckpt.is_file():
        return torch.load(ckpt, map_location="cpu", weights_only=False), ckpt
    if has_state(state_dir):
        return load_state(state_dir), Path(state_dir)
    return None, ckpt


def load_state(state_dir: Path) -> dict:
    """The checkpoint dict (joint.py's layout) of a state written by save_state; "opt" is None without moments."""
    state_dir = Path(state_dir)
    meta = json.loads((state_dir / STATE_JSON).read_text())
    t = load_file(str(state_dir / STATE_TENSORS))
    lora = {k[len("lora."):]: v.float() for k, v in t.items() if k.startswith("lora.")}
    opt = None
    if meta["moments"]:
        opt = {"param_groups": meta["param_groups"],
               "state": {int(i): {"step": torch.tensor(n), "exp_avg": t[f"opt.{i}.exp_avg"].float(),
                                  "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].float()}
                         for i, n in meta["opt_steps"].items()}}
    return {"config": meta["config"], "step": meta["step"], "lora": lora, "cls_row": t["cls_row"], "head": t["head"],
            "opt": opt, "sched": meta["sched"], "history": meta["history"], "from_state": str(state_dir)}
