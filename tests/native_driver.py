"""`cdam-fast segment` in a subprocess with the tiny test model registered (resume, torchrun and
memory tests of native mode). CDAM_TEST_BAND_DELAY (seconds) slows every stored band so that a
test can kill the run mid-way; CDAM_TEST_BAND_LOG appends "rank band" per stored band."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_clip import register_tiny_clip  # noqa: E402

register_tiny_clip()

from cdam_fast.pipeline.bandstore import BandStore  # noqa: E402

_save = BandStore.save


def _logged_save(self, band, logits, tag=""):
    _save(self, band, logits, tag)
    if os.environ.get("CDAM_TEST_BAND_LOG"):
        with open(os.environ["CDAM_TEST_BAND_LOG"], "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {band}\n")
    time.sleep(float(os.environ.get("CDAM_TEST_BAND_DELAY", "0")))


BandStore.save = _logged_save

if __name__ == "__main__":
    import resource

    import torch

    torch.set_num_threads(1)
    from cdam_fast.cli import main

    rc = main(sys.argv[1:])
    if os.environ.get("CDAM_TEST_PEAK_RSS"):
        with open(os.environ["CDAM_TEST_PEAK_RSS"], "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))  # KiB on Linux
    sys.exit(rc)
