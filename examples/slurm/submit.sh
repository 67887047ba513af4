#!/bin/bash
# The whole BIDS-App chain on SLURM: a participant array (preprocessing), the group level
# after it (fit), then a second participant array that applies the fitted model (finished
# preprocessing is read back, not redone). Each stage starts only if the one before succeeded.
#   examples/slurm/submit.sh BIDS OUT [bids_harmony options, e.g. --method histmatch]
# PER_TASK participants per array task (default 1; see participant.sbatch); MAX_PARALLEL caps
# the tasks running at once (default 50); PARTICIPANT_SBATCH and
# GROUP_SBATCH add sbatch options to each stage (e.g. "-p short --mem=4G"; they override the
# scripts' #SBATCH lines); BIDS_HARMONY (the command, see participant.sbatch) is passed on.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIDS=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
shift 2
# Participants: rows after the header with a first column (participant.sbatch's rule).
COUNT=$(awk -F'\t' 'NR > 1 && $1 != ""' "$BIDS/participants.tsv" | wc -l)
export PER_TASK=${PER_TASK:-1}
TASKS=$(( (COUNT + PER_TASK - 1) / PER_TASK ))
ARRAY="--array=1-$TASKS%${MAX_PARALLEL:-50}"
LOGS="$OUT/logs/slurm"
mkdir -p "$LOGS"
read -r -a PARTICIPANT <<< "${PARTICIPANT_SBATCH:-}"
read -r -a GROUP <<< "${GROUP_SBATCH:-}"
preprocess=$(sbatch --parsable "${PARTICIPANT[@]}" "$ARRAY" -o "$LOGS/participant-%A_%a.out" \
             "$HERE/participant.sbatch" "$BIDS" "$OUT" "$@")
group=$(sbatch --parsable "${GROUP[@]}" --dependency="afterok:$preprocess" -o "$LOGS/group-%j.out" \
        "$HERE/group.sbatch" "$BIDS" "$OUT" "$@")
apply=$(sbatch --parsable "${PARTICIPANT[@]}" --dependency="afterok:$group" "$ARRAY" \
        -o "$LOGS/apply-%A_%a.out" "$HERE/participant.sbatch" "$BIDS" "$OUT" "$@")
echo "participant array $preprocess, group $group, apply array $apply (logs: $LOGS)"
