#!/usr/bin/env bash
# Stage 1b: the global view's attention expert, on top of stage 1a's adapters (ZeRO-2).
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"
deepspeed_args zero2
$LAUNCHER -m slime_hf.train --stage 1b "${COMMON[@]}" "${PRETRAIN_DATA[@]}" \
  --pretrained_adapters "$OUT/$RUN-stage1a" \
  ${DS_ARGS[@]+"${DS_ARGS[@]}"} \
  --learning_rate "$PT_LR" --per_device_train_batch_size "$PT_BS" --gradient_accumulation_steps "$PT_GA" \
  --save_steps 24000 --save_total_limit 1 \
  --output_dir "$OUT/$RUN-stage1b" "$@"
