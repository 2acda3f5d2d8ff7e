#!/usr/bin/env bash
# Fine-tune a SliME release on your own LLaVA-format data with LoRA on ONE GPU (bf16, gradient checkpointing).
# RELEASE: the authors' release folder (e.g. SliME-vicuna-7B) or a converted / stage-3 folder.
# The LLM gets LoRA (r 128, alpha 256) on every linear layer; the vision adapters train fully (2e-5); CLIP is frozen.
# For a smaller GPU lower --lora_r or --per_device_train_batch_size (raise --gradient_accumulation_steps).
set -euo pipefail
RELEASE=${RELEASE:?set RELEASE to the model folder}
DATA_JSON=${DATA_JSON:?set DATA_JSON to your LLaVA-format JSON/JSONL}
IMAGE_FOLDER=${IMAGE_FOLDER:?set IMAGE_FOLDER to the folder of its images}
OUTPUT=${OUTPUT:-./checkpoints/slime-lora-finetune}
LAUNCHER=${LAUNCHER:-python}
$LAUNCHER -m slime_hf.train --stage 3 --model_name_or_path "$RELEASE" \
  --data_path "$DATA_JSON" --image_folder "$IMAGE_FOLDER" \
  --lora_enable True --lora_r 128 --lora_alpha 256 --lora_dropout 0.05 \
  --learning_rate 1e-4 --adapter_lr 2e-5 --weight_decay 0. --warmup_steps 0.03 --lr_scheduler_type cosine \
  --dtype bfloat16 --bf16 True --gradient_checkpointing True \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --num_train_epochs 1 \
  --model_max_length 2048 --logging_steps 10 --save_strategy steps --save_steps 500 --save_total_limit 2 \
  --dataloader_num_workers 4 --report_to none \
  --output_dir "$OUTPUT" "$@"
