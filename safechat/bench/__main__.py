import sys

from . import (answers, base_speed, categories, cls_variants, conversations, drift, frozen_speed, gil, joint_speed,
               memory, overhead, own_answers, policies, profile, soak, tradeoff, turns)

# "throughput" and "side_tokens" are kept as aliases: overhead and cls_variants measure what they did (and more)
# with the same options
COMMANDS = {"overhead": overhead.main, "throughput": overhead.main, "memory": memory.main,
            "policies": policies.main, "conversations": conversations.main, "soak": soak.main, "gil": gil.main,
            "profile": profile.main, "own_answers": own_answers.main,
            "cls_variants": cls_variants.main, "side_tokens": cls_variants.main, "base_speed": base_speed.main,
            "joint_speed": joint_speed.main, "answers": answers.main,
            "turns": turns.main, "categories": categories.main, "frozen_speed": frozen_speed.main, "drift": drift.main,
            "tradeoff": tradeoff.main}
MODULES = {"overhead": overhead, "memory": memory, "policies": policies, "conversations": conversations,
           "soak": soak, "gil": gil, "profile": profile, "own_answers": own_answers, "cls_variants": cls_variants,
           "base_speed": base_speed, "joint_speed": joint_speed, "answers": answers, "turns": turns,
           "categories": categories, "frozen_speed": frozen_speed, "drift": drift, "tradeoff": tradeoff}


def _usage() -> str:
    lines = ["usage: safechat bench COMMAND [options]   (COMMAND --help for its options; '-' or '_' alike; "
             "also python -m safechat.bench)", ""]
    for name, mod in MODULES.items():
        first = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
        lines.append(f"  {name.replace('_', '-'):15s} {first}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`safechat bench COMMAND ...` (also `python -m safechat.bench COMMAND ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0].replace("-", "_") if argv else ""
    if name in ("__help", "_h"):
        print(_usage())
        return 0
    if name not in COMMANDS:
        print(_usage(), file=sys.stderr)
        return 2
    return COMMANDS[name](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
