#!/usr/bin/env bash
# Stage 1a: the global view's MLP expert, from the base LLM and CLIP (ZeRO-2). Output: adapter weights only.
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"
deepspeed_args zero2
$LAUNCHER -m slime_hf.train --stage 1a "${COMMON[@]}" "${PRETRAIN_DATA[@]}" \
  ${DS_ARGS[@]+"${DS_ARGS[@]}"} \
  --learning_rate "$PT_LR" --per_device_train_batch_size "$PT_BS" --gradient_accumulation_steps "$PT_GA" \
  --save_steps 24000 --save_total_limit 1 \
  --output_dir "$OUT/$RUN-stage1a" "$@"
