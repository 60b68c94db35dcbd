import sys

from . import (answers, base_speed, categories, cls_variants, conversations, gil, joint_speed, memory, overhead, own_answers, policies,
               profile, soak, turns)

# "throughput" and "side_tokens" are kept as aliases: overhead and cls_variants measure what they did (and more)
# with the same options
COMMANDS = {"overhead": overhead.main, "throughput": overhead.main, "memory": memory.main,
            "policies": policies.main, "conversations": conversations.main, "soak": soak.main, "gil": gil.main,
            "profile": profile.main, "own_answers": own_answers.main,
            "cls_variants": cls_variants.main, "side_tokens": cls_variants.main, "base_speed": base_speed.main,
            "joint_speed": joint_speed.main, "answers": answers.main,
            "turns": turns.main, "categories": categories.main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]")
    sys.exit(2)
sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
