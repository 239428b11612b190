#!/usr/bin/env bash
# Run one dlmjax job on EVERY host of a TPU pod slice (multi-controller JAX: one process per host, same command).
#
# usage: TPU_NAME=<tpu vm name> ZONE=<zone> [PROJECT=<gcp project>] [DLMJAX_REPO=<repo dir on the hosts>] \
#          bash launch/tpu_pod.sh [--dry-run] FLAGFILE [extra absl flags ...]
#
#   FLAGFILE      path relative to the repo on the hosts, e.g. launch/flags/trims_llada8b.flags (sft) or
#                 launch/flags/slim_rl_trado4b_math.flags (rl)
#   extra flags   appended after the flagfile, so they override it (absl: the last value wins), e.g.
#                 --init_ckpt=/mnt/ckpt/llada-8b-instruct --data=... --workdir=...
#   --dry-run     print the gcloud command instead of running it
#
# What it runs on each host (gcloud ... ssh --worker=all):
#   cd $DLMJAX_REPO && export JAX_PLATFORMS=tpu DLMJAX_JAX_EXTRA=tpu && source launch/env.sh
#   && (libtpu present || pip install jax[tpu]==0.10.2) && python -m dlmjax.launch --distributed --flagfile=... ...
#
# - --distributed: jax.distributed.initialize() auto-detects the TPU slice (coordinator, process count and id), so no
#   --coordinator / --num_processes / --process_id flags. --job=sft and --job=rl take --distributed; run
#   --job=trims_score on one host (`python -m dlmjax.launch --flagfile=launch/flags/trims_score_qwen3_8b.flags ...`).
# - --job=rl: every host needs the prompt JSONL (each draws the same seeded prompt order and rolls out its block of
#   each step's rollouts on the shared mesh); prompts_per_step x group_size and --batch_size must be multiples of the
#   mesh's data x fsdp = chips / mesh_tensor (an error line says so otherwise): the recipes' 8-row minibatches need
#   --mesh_tensor=chips/8 on more than 8 chips (or a larger --batch_size, which changes the recipe). Reward workers
#   (--reward_workers) run on every host.
# - The venv: launch/env.sh installs the CPU jaxlib from pyproject.toml; TPU hosts also need libtpu, i.e.
#   `jax[tpu]==0.10.2` (same jax/jaxlib versions, plus the libtpu plugin). DLMJAX_JAX_EXTRA=tpu asks env.sh for it;
#   the explicit `pip install` after it makes this work with an env.sh that does not (yet) read that variable and
#   is a no-op once libtpu is installed. JAX_PLATFORMS=tpu overrides env.sh's CPU default.
# - Every host needs the repo at $DLMJAX_REPO (default ~/dlmjax), e.g.
#     gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=$ZONE . $TPU_NAME:~/dlmjax
#   and the same paths for --init_ckpt / --data on every host. --workdir must be ONE directory shared by all hosts
#   (a Filestore/NFS or gcsfuse mount at the same path everywhere): orbax writes one checkpoint from all processes
#   and process 0 writes tb/ and final/ there.
set -euo pipefail

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
case "${1:-}" in
  ""|-h|--help) usage ;;
  -*) echo "error: the first argument must be the flagfile, got '$1'" >&2; usage ;;
esac
FLAGFILE="$1"
shift

: "${TPU_NAME:?set TPU_NAME to the TPU VM name (gcloud compute tpus tpu-vm list)}"
: "${ZONE:?set ZONE to the TPU VM zone, e.g. us-east5-a}"
REPO="${DLMJAX_REPO:-~/dlmjax}"

# The remote command, each user argument shell-quoted once for the remote bash.
EXTRA=""
for a in "$@"; do
  EXTRA+=" $(printf '%q' "$a")"
done
REMOTE="cd ${REPO} && export JAX_PLATFORMS=tpu DLMJAX_JAX_EXTRA=tpu && source launch/env.sh"
REMOTE+=' && { python -c "import libtpu" 2>/dev/null || pip install -q "jax[tpu]==0.10.2"; }'
REMOTE+=" && python -m dlmjax.launch --distributed --flagfile=$(printf '%q' "$FLAGFILE")${EXTRA}"

CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  CMD+=("--project=$PROJECT")
fi
CMD+=("--command=$REMOTE")

if [ "$DRY_RUN" = 1 ]; then  # readable and copy-pasteable: the remote command in single quotes
  printf '%q ' "${CMD[@]:0:${#CMD[@]}-1}"
  printf "%s'%s'\n" "--command=" "${REMOTE//\'/\'\\\'\'}"
  exit 0
fi
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (or not on PATH)" >&2; exit 1; }
exec "${CMD[@]}"
