#!/usr/bin/env bash
# Stage 3: everything but CLIP (LLM, global adapter with its gate, local compressor; router top-p 0.95), on top of
# stage 2's adapters (ZeRO-3). Output: a full model folder (Auto classes, remote code, model card).
# LORA=1: the authors' Llama-3 LoRA variant (r 128, alpha 256, LLM lr 1e-4, adapters 2e-5).
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"
deepspeed_args zero3
EXTRA=(--learning_rate "$FT_LR")
if [[ "${LORA:-0}" == "1" ]]; then
  EXTRA=(--lora_enable True --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 --learning_rate 1e-4 --adapter_lr 2e-5)
  RUN="$RUN-lora"
fi
$LAUNCHER -m slime_hf.train --stage 3 "${COMMON[@]}" "${FINETUNE_DATA[@]}" \
  --pretrained_adapters "$OUT/${RUN%-lora}-stage2" \
  ${DS_ARGS[@]+"${DS_ARGS[@]}"} "${EXTRA[@]}" \
  --per_device_train_batch_size "$FT_BS" --gradient_accumulation_steps "$FT_GA" \
  --save_steps 10000 --save_total_limit 10 \
  --output_dir "$OUT/$RUN-stage3" "$@"
