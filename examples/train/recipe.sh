# Shared settings of the SliME recipe (the authors' scripts/vicuna/vicuna_7b_{pt,sft}.sh and
# scripts/llama/llama3_8b_{pt,sft}.sh; 8 x A100 80GB). Sourced by the stage scripts; every variable can be overridden
# from the environment, and extra arguments of a stage script are passed on to `slime_hf.train`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FAMILY=${FAMILY:-vicuna}                  # vicuna (Vicuna-7B/13B) or llama3 (Llama-3-8B-Instruct)
NUM_GPUS=${NUM_GPUS:-8}
LAUNCHER=${LAUNCHER:-"torchrun --nproc_per_node ${NUM_GPUS}"}
DATA=${DATA:-./playground/data}           # LLaVA-Pretrain, ShareGPT4V and SMR, as in the authors' README
OUT=${OUT:-./checkpoints}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
REPORT_TO=${REPORT_TO:-none}

# Learning rates and per-device batches of the authors' scripts: global batch 256 in stages 1-2, 128 in stage 3.
case "$FAMILY" in
  vicuna)
    LLM=${LLM:-lmsys/vicuna-7b-v1.5}
    PT_LR=1e-3; PT_BS=32; PT_GA=1        # stages 1a, 1b
    LOCAL_LR=1e-3; LOCAL_BS=32; LOCAL_GA=1  # stage 2
    FT_LR=2e-5; FT_BS=16; FT_GA=1        # stage 3
    ;;
  llama3)
    LLM=${LLM:-meta-llama/Meta-Llama-3-8B-Instruct}
    PT_LR=5e-4; PT_BS=32; PT_GA=1
    LOCAL_LR=5e-4; LOCAL_BS=8; LOCAL_GA=4
    FT_LR=1e-5; FT_BS=8; FT_GA=2
    ;;
  *)
    echo "FAMILY must be vicuna or llama3, got '$FAMILY'" >&2
    exit 1
    ;;
esac
RUN=${RUN:-slime-${FAMILY}}

# Flags of every stage. The original's --group_by_modality_length True is left out on purpose: its trainer never
# read it, so the releases were trained with a plain random sampler (add it to get upstream LLaVA's sampler).
COMMON=(
  --model_name_or_path "$LLM" --vision_tower "$VISION_TOWER"
  --bf16 True --tf32 True --gradient_checkpointing True
  --num_train_epochs 1 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine
  --model_max_length 2048 --logging_steps 1 --dataloader_num_workers 4 --report_to "$REPORT_TO"
  --save_strategy steps
)
# Stages 1a, 1b, 2: LLaVA-558K captions with the plain template.
PRETRAIN_DATA=(
  --data_path "$DATA/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json" --image_folder "$DATA/LLaVA-Pretrain/images"
)
# Stage 3: ShareGPT4V mix + SMR with the LLM's chat template.
FINETUNE_DATA=(
  --data_path "$DATA/sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.json" "$DATA/SMR.json"
  --image_folder "$DATA"
)

# DeepSpeed config of a stage: the recipe's zero2/zero3 file by default, another file with DEEPSPEED=path, none with
# DEEPSPEED=none (e.g. for FSDP: LAUNCHER="accelerate launch --config_file examples/train/accelerate_fsdp.yaml").
deepspeed_args() {
  case "${DEEPSPEED:-recipe}" in
    recipe) DS_ARGS=(--deepspeed "$HERE/$1.json") ;;
    none) DS_ARGS=() ;;
    *) DS_ARGS=(--deepspeed "$DEEPSPEED") ;;
  esac
}
