#!/bin/bash
# usage: bench/byte_identity.sh CHECKOUT OUTDIR WORLD: builds det3d (2 settings), pointmap (2), cot (oracle, sim)
# on a 2x2 sample world with CHECKOUT's code; OUTDIR/digests.txt, OUTDIR/help_*.txt. Compare two with bench/byte_identity.py.
set -e
WT=$1; OUT=$2
rm -rf $OUT; mkdir -p $OUT
cd $WT
export PYTHONPATH=$WT
PY=".venv/bin/python -m pipelines.cli"
W=${3:?WORLD dir (made once, shared by both builds)}; B=$OUT/builds
EX="--executor local --workers 1 --chunk-size 4 --quiet"
[ -d $W ] || nice $PY sample-world --out $W --scenes 2 --views 2 --seed 0
for c in det3d pointmap cot; do nice $PY build $c --help > $OUT/help_$c.txt; done
nice $PY build det3d --sample-world $W --out $B/det3d $EX
nice $PY build det3d --sample-world $W --out $B/det3d_eval --omni3d-ignore eval --omni3d-rule max_depth=none --min-z 0.1 --prompt-salt x $EX
nice $PY build pointmaps --source embodiedscan --embodiedscan $(ls $W/embodiedscan/*.pkl) --data-root $W --out $B/pointmap $EX
nice $PY build pointmaps --source embodiedscan --sample-world $W --out $B/pointmap_sw --points 50 --mode depth_stratified --conversations 2 --points-per-conversation 5 --keep-depth $EX
nice $PY build cot --refspatial RefSpatial/3D/reasoning_template_qa.json RefSpatial/3D/choice_qa.json --data-root $W --ground-truth $W/ground_truth.json --tagger oracle --verifier oracle --out $B/cot $EX
nice $PY build cot --sample-world $W --tagger sim --verifier sim --noise-scale 0.7 --sim-seed 3 --sim-miss 0.2 --out $B/cot_sim $EX
cd $B && find . -type f | sort | xargs sha256sum > $OUT/digests.txt
