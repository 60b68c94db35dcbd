import sys

from . import base_speed, conversations, gil, memory, overhead, own_answers, policies, profile, side_tokens, soak

# "throughput" is kept as an alias: overhead measures what it did (and more) with the same options
COMMANDS = {"overhead": overhead.main, "throughput": overhead.main, "memory": memory.main,
            "policies": policies.main, "conversations": conversations.main, "soak": soak.main, "gil": gil.main,
            "profile": profile.main, "own_answers": own_answers.main,
            "side_tokens": side_tokens.main, "base_speed": base_speed.main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]")
    sys.exit(2)
sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
