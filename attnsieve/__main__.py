import sys

try:
    from attnsieve.cli import main
except KeyboardInterrupt:  # Ctrl-C while starting up: the same one line as during a command
    print("attnsieve: interrupted", file=sys.stderr)
    sys.exit(130)

main()
