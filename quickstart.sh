#!/usr/bin/env bash
# The whole shapes pipeline on a laptop CPU, nanoGPT's shakespeare_char for DualToken:
#   teacher (SigLIP) -> DualToken tokenizer -> unified MLLM -> samples -> eval JSONs, all under out/.
# Usage: bash quickstart.sh            (installs requirements first; SKIP_INSTALL=1 to skip)
#        OVERWRITE=1 bash quickstart.sh  (train again over the models of an earlier run; without it the
#                                         trainers refuse an out_dir that holds a model)
set -euo pipefail
cd "$(dirname "$0")"
[ "${SKIP_INSTALL:-0}" = 1 ] || python -m pip install -q -r requirements.txt
# threads: torch uses every core; on a machine busy with other work OMP_NUM_THREADS=1 can be faster
start=$(date +%s)
ow="--overwrite=${OVERWRITE:-0}"
python train_siglip.py config/shapes.py "$ow"
python train_tokenizer.py config/shapes.py "$ow"
python train_mllm.py config/shapes.py "$ow"
python data.py export out/heldout 8 48   # 8 val images at the preset's 48 px
python sample.py reconstruct --tokenizer=out-shapes/tokenizer --images=out/heldout --out_dir=out/samples
python sample.py generate --mllm=out-shapes/mllm --captions=out/heldout/captions.txt --num_per_caption=2 \
    --seed=0 --out_dir=out/samples    # the sampler the trainer evaluated with (config.json "sampling")
python sample.py answer --mllm=out-shapes/mllm --image=out/heldout/val_0000.png \
    --question="how many objects are there?" --out_dir=out/samples
python eval.py tokenizer --tokenizer=out-shapes/tokenizer --teacher=out-shapes/siglip --data=shapes --out=out/eval_tokenizer.json
python eval.py mllm --mllm=out-shapes/mllm --out=out/eval_mllm.json
echo "quickstart finished in $(( $(date +%s) - start )) s; see out/samples/ and out/eval_*.json"
