"""`python -m dlmjax.launch --job=... [--flagfile=...]` (the job list below comes from dlmjax.launch.registry)."""

import os
import sys

from absl import app, flags

from dlmjax.launch import main, usage_doc

__doc__ = usage_doc()  # absl prints the __main__ module's docstring for --help / --helpshort


def parse_flags(argv):
    """absl's parse, with a flag error (unknown flag, bad value) as one `error: ...` line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (--helpfull lists every flag)", file=sys.stderr)
        sys.exit(2)


def _drop_closed_loop_reports():
    """After a failed orbax save / restore, tensorstore callbacks still running in its threads report
    `RuntimeError: Event loop is closed` through sys.excepthook (PyErr_Print), interleaving tracebacks with the one
    `error:` line the user should see. Drop exactly those reports; every other exception is printed as before."""
    prev = sys.excepthook

    def hook(tp, value, tb):
        if tp is RuntimeError and str(value) == "Event loop is closed":
            return
        prev(tp, value, tb)

    sys.excepthook = hook


def main_or_exit(argv):
    """main; after an input error (exit code 2, already reported on one `error:` line) leave at once: a failed
    orbax restore or save leaves tensorstore callbacks behind that print tracebacks during interpreter teardown."""
    _drop_closed_loop_reports()
    code = main(argv)
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    return code


if __name__ == "__main__":
    app.run(main_or_exit, flags_parser=parse_flags)
