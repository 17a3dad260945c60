"""`python -m vae_pipeline ARGS`: runs the installed `vae-pipeline` binary with ARGS."""
import os
import sys

from vae_pipeline import find_bin


def main() -> None:
    binary = find_bin()
    if sys.platform == "win32":
        import subprocess

        sys.exit(subprocess.run([binary, *sys.argv[1:]]).returncode)
    os.execvp(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
