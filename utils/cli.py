"""What every script does with its inputs first (the data folder exists) and with an InputError last (one
`error:` line, exit code 2). The flags themselves are declared in utils/settings.py."""
import sys
from pathlib import Path

from .errors import InputError


def check_dataroot(dataroot) -> Path:
    dataroot = Path(dataroot)
    if not dataroot.is_dir():
        raise InputError(f"dataroot {dataroot} does not exist; run `bash data/download_abc.sh` "
                         f"or pass --dataroot")
    return dataroot


def run(main) -> None:
    """Call main(); an InputError prints 'error: ...' and exits 2, an interrupt (Ctrl-C) one line and exits 130
    (finished outputs stay on disk either way)."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: what was finished is on disk (a query when its influence.pkl is, a model's loss cache when "
              "its settings.json is); rerun the same command to go on from there", file=sys.stderr)
        sys.exit(130)
