"""Run CCD, or a RecBole model, through the time-ordered stages of a dataset.

    python run_ccd.py                                   # CCD on ml-100k
    python run_ccd.py --model=CCD --dataset=gowalla
    python run_ccd.py --model=BPR --dataset=gowalla --stream_strategy=retrain
    python run_ccd.py --resume=outputs/CCD-gowalla-...  # continue a stopped run
"""

import sys

from recbole_ccd.quick_start import main

if __name__ == "__main__":
    sys.exit(main())
