#!/usr/bin/env bash
# Stage 2: the local compressor (router top-p 1.0), on top of stage 1b's adapters (ZeRO-2).
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"
deepspeed_args zero2
$LAUNCHER -m slime_hf.train --stage 2 "${COMMON[@]}" "${PRETRAIN_DATA[@]}" \
  --pretrained_adapters "$OUT/$RUN-stage1b" \
  ${DS_ARGS[@]+"${DS_ARGS[@]}"} \
  --learning_rate "$LOCAL_LR" --per_device_train_batch_size "$LOCAL_BS" --gradient_accumulation_steps "$LOCAL_GA" \
  --save_steps 24000 --save_total_limit 1 \
  --output_dir "$OUT/$RUN-stage2" "$@"
