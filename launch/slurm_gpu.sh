#!/usr/bin/env bash
#SBATCH --job-name=dlmjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Multi-node GPU run of one dlmjax job: one JAX process per node driving all of that node's GPUs.
#
# usage: sbatch [--nodes=N --gpus-per-node=G ...] launch/slurm_gpu.sh FLAGFILE [extra absl flags ...]
#        bash launch/slurm_gpu.sh --dry-run FLAGFILE [extra absl flags ...]   (print the srun command only)
#
#   FLAGFILE      e.g. launch/flags/llada_mdlm_sft.flags or launch/flags/tracerl_trado4b_math.flags (relative
#                 to the repo: sbatch from the repo root)
#   extra flags   appended after the flagfile, so they override it (absl: the last value wins), e.g.
#                 --init_ckpt=/shared/ckpt/llada-8b-instruct --data=/shared/data/sft.jsonl --workdir=/shared/runs/x
#
# - --distributed: jax.distributed.initialize() auto-detects SLURM (coordinator = first node, process id =
#   SLURM_PROCID, count = SLURM_NTASKS), so no --coordinator flags. --job=sft and --job=rl take --distributed
#   (rl: every node reads the prompt JSONL; prompts_per_step x group_size and --batch_size must be multiples of the
#   mesh's data x fsdp = GPUs / mesh_tensor: the RL recipes' 8-row minibatches on 2 x 8 GPUs need --mesh_tensor=2).
# - The venv: each task sources launch/env.sh with JAX_PLATFORMS=cuda and DLMJAX_JAX_EXTRA=cuda12. env.sh installs
#   the CPU jaxlib from pyproject.toml; GPUs also need `jax[cuda12]==0.10.2` (CUDA plugin + pip CUDA libraries).
#   The explicit `pip install` below makes that work with an env.sh that does not (yet) read DLMJAX_JAX_EXTRA and is
#   a no-op once the plugin is installed. With a shared repo the venv is built once, by the batch step, before srun.
# - --workdir must be on a filesystem every node sees at the same path (orbax writes one checkpoint from all
#   processes; process 0 writes tb/ and final/), and --init_ckpt / --data must be readable from every node.
set -euo pipefail

usage() {
  sed -n '11,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
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

# sbatch runs a copy of this script from the spool directory: the repo is the submission directory.
REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
EXTRA=""
for a in "$@"; do
  EXTRA+=" $(printf '%q' "$a")"
done
# Venv set-up (launch/env.sh: created on first use, then only activated) + the CUDA plugin; then the launcher.
SETUP="cd $(printf '%q' "$REPO") && export JAX_PLATFORMS=cuda DLMJAX_JAX_EXTRA=cuda12 && source launch/env.sh"
SETUP+=' && { python -c "import jax_cuda12_plugin" 2>/dev/null || pip install -q "jax[cuda12]==0.10.2"; }'
TASK="$SETUP && exec python -m dlmjax.launch --distributed --flagfile=$(printf '%q' "$FLAGFILE")${EXTRA}"
CMD=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$TASK")

if [ "$DRY_RUN" = 1 ]; then  # readable and copy-pasteable: the task command in single quotes
  printf '%s ' "${CMD[@]:0:${#CMD[@]}-1}"
  printf "'%s'\n" "${TASK//\'/\'\\\'\'}"
  exit 0
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: not inside a SLURM allocation: submit with 'sbatch launch/slurm_gpu.sh FLAGFILE ...'" \
       "(or use --dry-run to see the command)" >&2
  exit 1
fi
# Build the venv once here (first node) so that with a shared repo the tasks only activate it (no concurrent
# installs); with node-local copies each task builds its own.
bash -c "$SETUP"
echo "[dlmjax] $SLURM_JOB_NUM_NODES nodes, ${SLURM_GPUS_PER_NODE:-?} GPUs each: ${CMD[*]}" >&2
exec "${CMD[@]}"
