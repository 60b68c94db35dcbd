import sys

from . import policies, soak, throughput

COMMANDS = {"throughput": throughput.main, "policies": policies.main, "soak": soak.main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]")
    sys.exit(2)
sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
