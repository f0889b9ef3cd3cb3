#!/usr/bin/env bash
# The Camelyon16 study end to end with the public CLI: labels → extract → train (5-fold CV) → eval → heatmaps.
#
#   pipelines/camelyon16.sh SLIDES_DIR REFERENCE_CSV OUT_DIR
#
# SLIDES_DIR     the Camelyon16 slides: training/{normal,tumor}/*.tif and testing/images/*.tif, in one
#                folder or in subfolders of it (normal_001.tif, tumor_001.tif, test_001.tif, …)
# REFERENCE_CSV  Camelyon16's testing/reference.csv (test_001,Tumor,Macro,None …): the test slides' labels
# OUT_DIR        gets labels.csv, features/ (one HDF5 file per slide, manifest.csv, qc/), runs/<name>/
#
# Settings (environment variables, defaults in brackets):
#   WEIGHTS      torchvision ResNet-50 state dict (resnet50-*.pth) for the patch encoder [required unless RANDOM_INIT=1]
#   RANDOM_INIT  1: random encoder weights (only to try the pipeline out) [0]
#   ENCODER [resnet50-trunc]  TARGET_MPP [0.5 = 20×]  PATCH_SIZE [256]  DEVICE [auto]  BATCH_SIZE [256]  WORKERS [8]
#   EXTRACT_EXTRA  more `wsimamba extract` options, e.g. "--format zarr" []
#   CONFIG [configs/camelyon.yaml]   NAME [camelyon16-lbmambamil]
#   SPLIT        cv: 5-fold case-grouped cross-validation over all 399 slides;
#                official: train on the 270 training slides, test on the 129 test slides [cv]
#   TRAIN_SET    more `--set key=value` overrides for training, e.g. "model.name=abmil train.max_epochs=50" []
#   HEATMAPS     number of tumor slides to draw heatmaps for (Camelyon16 has no masks in our format) [8]
#   WSIMAMBA     the command to run [wsimamba]
# Every step skips what is done: rerunning the script after an interruption resumes it.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: $0 SLIDES_DIR REFERENCE_CSV OUT_DIR" >&2
    exit 2
fi
SLIDES=$1 REFERENCE=$2 OUT=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a W <<< "${WSIMAMBA:-wsimamba}"
CONFIG=${CONFIG:-$HERE/../configs/camelyon.yaml}
NAME=${NAME:-camelyon16-lbmambamil}
SPLIT=${SPLIT:-cv}
HEATMAPS=${HEATMAPS:-8}
[[ -d $SLIDES ]] || { echo "error: $SLIDES: no such slide folder" >&2; exit 1; }
[[ -f $REFERENCE ]] || { echo "error: $REFERENCE: no such reference CSV" >&2; exit 1; }
[[ $SPLIT == cv || $SPLIT == official ]] || { echo "error: SPLIT must be cv or official, got $SPLIT" >&2; exit 1; }
mkdir -p "$OUT"

# 1. labels.csv from the slide names (training) and reference.csv (testing); one patient per slide.
#    All slides are gathered (by symlink) into one folder for extract.
mkdir -p "$OUT/slides"
find -L "$SLIDES" -type f \( -iname '*.tif' -o -iname '*.tiff' -o -iname '*.svs' \) -print0 |
    while IFS= read -r -d '' f; do ln -sf "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$OUT/slides/"; done
if ! compgen -G "$OUT/slides/*" > /dev/null; then
    echo "error: no .tif/.tiff/.svs slides under $SLIDES" >&2; exit 1
fi
tmp="$OUT/.labels.csv.partial"
{
    if [[ $SPLIT == official ]]; then echo "slide_id,case_id,label,split"; else echo "slide_id,case_id,label"; fi
    for f in "$OUT"/slides/*; do
        id=$(basename "$f"); id=${id%.*}
        case $id in
            normal_*) label=normal; part=train ;;
            tumor_*) label=tumor; part=train ;;
            test_*)
                label=$(awk -F, -v id="$id" '$1 == id { print tolower($2) }' "$REFERENCE" | tr -d '\r ')
                part=test
                if [[ $label != normal && $label != tumor ]]; then
                    echo "error: $REFERENCE has no Tumor/Normal label for $id" >&2; exit 1
                fi ;;
            *) echo "error: $f: not a Camelyon16 slide name (normal_*, tumor_*, test_*)" >&2; exit 1 ;;
        esac
        if [[ $SPLIT == official ]]; then echo "$id,$id,$label,$part"; else echo "$id,$id,$label"; fi
    done
} > "$tmp"
mv "$tmp" "$OUT/labels.csv"
echo "labels: $OUT/labels.csv ($(($(wc -l < "$OUT/labels.csv") - 1)) slides)"

# 2. patch features at 20×
if [[ ${RANDOM_INIT:-0} == 1 ]]; then
    enc_weights=(--random-init)
elif [[ -n ${WEIGHTS:-} ]]; then
    enc_weights=(--weights "$WEIGHTS")
else
    echo "error: set WEIGHTS to a ResNet-50 state dict (or RANDOM_INIT=1 to try the pipeline out)" >&2
    exit 1
fi
read -r -a extract_extra <<< "${EXTRACT_EXTRA:-}"
status=0
"${W[@]}" extract "$OUT/slides" --out "$OUT/features" --encoder "${ENCODER:-resnet50-trunc}" "${enc_weights[@]}" \
    --target-mpp "${TARGET_MPP:-0.5}" --patch-size "${PATCH_SIZE:-256}" --device "${DEVICE:-auto}" \
    --batch-size "${BATCH_SIZE:-256}" --workers "${WORKERS:-8}" "${extract_extra[@]}" || status=$?
if [[ $status -ne 0 ]]; then
    echo "warning: some slides failed to extract (see $OUT/features/manifest.csv); training without them" >&2
fi

# 3. train (cross-validation, or the official split with a validation part carved from training)
read -r -a train_set <<< "${TRAIN_SET:-}"
split_set=()
# the official split has no validation slides: train.val_fraction of the training slides are held out, by case
[[ $SPLIT == official ]] && split_set=(train.split=column)
"${W[@]}" train --cfg "$CONFIG" --skip-missing --no-progress --set "name=$NAME" "data.features=$OUT/features" \
    "data.labels=$OUT/labels.csv" "out=$OUT/runs" "${split_set[@]}" "${train_set[@]}"
RUN="$OUT/runs/$NAME"

# 4. metrics table and ROC / confusion / calibration PNGs
"${W[@]}" eval "$RUN"

# 5. attention heatmaps of the first tumor slides
slides=()
n=0
while IFS=, read -r id _ label _; do
    [[ $label == tumor && $n -lt $HEATMAPS ]] || continue
    for f in "$OUT"/slides/"$id".*; do
        if [[ -f $f && -f $OUT/features/$id.h5 ]]; then slides+=(--slide "$f"); n=$((n + 1)); fi
    done
done < <(tail -n +2 "$OUT/labels.csv")
if [[ ${#slides[@]} -gt 0 ]]; then
    "${W[@]}" heatmap "$RUN" "${slides[@]}"
fi
echo "done: $RUN (summary.json, eval/, heatmaps/)"
