# make demo : PW-Self end to end on the CPU (set-up, real data, training, k-NN vs random init,
#             patch-matching figure, training curves): 12 min 50 s from a fresh clone on 2 idle cores.
# make compare : PW-Self against DINO on Fashion-MNIST, 3 seeds each, k-NN / linear / correspondence, one
#             table (compare_output/comparison.md): 114 min of compute measured on 2 cores shared with other jobs (one
#             training alone takes 10 min); reruns reuse what is done.
# make compare-ablation : after make compare, the 2024 method's parts in one table (compare_ablation/comparison.md):
#             PW-Self with patch-level photometric augmentation and with a separate patch head (3 seeds each), about
#             100 minutes on 2 cores.
# make compare-more : after make compare, the investigations of docs/results.md (CLS weight, matching rule,
#             10 epochs, patch 4), about 1 hour 40 minutes on 2 cores.
# make compare-scenes : PW-Self against DINO trained on multi-garment scene canvases (labels unused), 3 seeds each,
#             segmentation from frozen patch tokens (linear probe and retrieval mIoU) and correspondence
#             (compare_scenes/comparison.md), 68 minutes on 2 cores.
# make compare-scenes-transfer : after make compare, its single-garment models evaluated alike on the scenes
#             (compare_scenes_transfer/comparison.md), 33 minutes on 2 cores.
# make compare-cifar10 CIFAR10=path/to/cifar-10-python.tar.gz : the same on CIFAR-10 at 32 px, patch 4, on a GPU
#             (a starting recipe, not run by us: we had no GPU).
# make continue-holdout : after make compare, the holdout sweep behind the defaults of a run started from weights
#             (docs/continued_pretraining.md), about 2 h 20 min on 2 cores.
# make continue-demo : after make compare, its DINO teachers continued with DINO and PW-Self on the scenes, 3 seeds
#             (continue_scenes/comparison.md, continue_fmnist/comparison.md), 1 h 27 min on 2 cores.
# make test : the test suite (set-up included); .ci/run calls it.
# make bench-gpu : the tables of docs/performance.md on one CUDA GPU (four runs; not timed yet: no GPU so far).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo_output
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARCH := --arch vit_tiny --patch_size 8 --embed_dim 96 --depth 3 --num_heads 3
EVAL := $(ARCH) --data_path $(DEMO)/data --resize_size 32 --crop_size 32 --num_workers 2 --device cpu
# The demo's training recipe, also the comparison's (chosen on the holdout split, see docs/results.md).
RECIPE := $(ARCH) --out_dim 512 --head_hidden_dim 256 --head_bottleneck_dim 64 --global_crops_size 32 \
	--local_crops_size 16 --local_crops_number 2 --batch_size_per_gpu 32 --epochs 40 --warmup_epochs 3 \
	--lr 0.006 --momentum_teacher 0.99 --teacher_temp 0.02 --warmup_teacher_temp 0.02 --print_freq 500
COMPARE := compare_output
COMPARE_DATA := data/fashion_mnist_holdout
SCENES := data/fashion_mnist_scenes
# The comparison's recipe on 64 px canvases: 48 and 24 px crops keep a garment's share of a crop near the
# single-garment one; evaluations see the whole 64 px canvas (8 x 8 patches).
SCENE_RECIPE := $(RECIPE) --global_crops_size 48 --local_crops_size 24
# The scene tables were measured with eval_correspondence.py's earlier protocol (equal views, no colour): kept here.
SCENE_RUN := $(PY) compare.py --data_path $(SCENES) --seeds 3 --crop_size 64 --segmentation_args "--epochs 10" \
	--correspondence_args "--num_images 1000 --query_size 64 --query_scale 0.2 0.6 --photometric false" \
	--device cpu --num_workers 2
CIFAR10 ?= cifar-10-python.tar.gz
CIFAR_RECIPE := --arch vit_small --patch_size 4 --global_crops_size 32 --local_crops_size 16 --local_crops_number 6 \
	--out_dim 8192 --batch_size_per_gpu 256 --epochs 100 --warmup_epochs 10 --lr 0.001 --momentum_teacher 0.99 \
	--teacher_temp 0.04 --warmup_teacher_temp 0.04 --print_freq 50

.PHONY: setup test demo compare compare-ablation compare-more compare-scenes compare-scenes-transfer compare-cifar10 \
	fashion-mnist scenes continue-holdout continue-demo clean-demo bench-gpu

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q

fashion-mnist: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', then make demo again"; exit 1; \
	fi

demo: setup fashion-mnist
	$(PY) prepare_data.py --dataset fashion_mnist --output_dir $(DEMO)/data --limit_per_class 200
	$(PY) patch_wise_dino.py $(RECIPE) --data_path $(DEMO)/data/train --output_dir $(DEMO)/train --device cpu --num_workers 2
	$(PY) eval_knn.py --pretrained_weights $(DEMO)/train/checkpoint.pth $(EVAL) --output_json $(DEMO)/knn_trained.json
	$(PY) eval_knn.py --random_init $(EVAL) --output_json $(DEMO)/knn_random.json
	$(PY) patch_matching.py --output $(DEMO)/result.png
	$(PY) demo_report.py --run_dir $(DEMO)/train --trained $(DEMO)/knn_trained.json \
		--random $(DEMO)/knn_random.json --output $(DEMO)/training_curves.png

COMPARE_RUN := $(PY) compare.py --data_path $(COMPARE_DATA) --seeds 3 --linear_lr 0.3 \
	--correspondence_args "--num_images 1000" --device cpu --num_workers 2 --train_args "$(RECIPE)"

compare: setup fashion-mnist
	$(PY) prepare_data.py --dataset fashion_mnist --output_dir $(COMPARE_DATA) --limit_per_class 200 --holdout 100
	$(COMPARE_RUN) --output_dir $(COMPARE)

compare-ablation: compare
	test -d compare_ablation || cp -r $(COMPARE) compare_ablation
	$(COMPARE_RUN) --output_dir compare_ablation --extend --variant "patch_augment=--patch_augment true" \
		--variant "separate_head=--patch_head separate"

compare-more: compare
	test -d compare_more || cp -r $(COMPARE) compare_more
	$(COMPARE_RUN) --output_dir compare_more --extend --variant "cls05=--cls_weight 0.5" --variant "centre=--matching centre"
	$(COMPARE_RUN) --output_dir compare_10ep --train_args "$(RECIPE) --epochs 10"
	$(COMPARE_RUN) --output_dir compare_p4 --train_args "$(RECIPE) --patch_size 4"

scenes: setup fashion-mnist
	test -f $(SCENES)/VOC2012/ImageSets/Segmentation/val.txt || $(PY) prepare_data.py --dataset fashion_mnist_scenes --output_dir $(SCENES)

compare-scenes: scenes
	$(SCENE_RUN) --train_args "$(SCENE_RECIPE)" --output_dir compare_scenes

compare-scenes-transfer: compare scenes
	$(SCENE_RUN) --trained_in $(COMPARE) --output_dir compare_scenes_transfer

compare-cifar10: setup
	$(PY) prepare_data.py --dataset cifar10 --source $(CIFAR10) --output_dir data/cifar10_holdout --holdout 500
	$(PY) compare.py --data_path data/cifar10_holdout --output_dir compare_cifar10 --seeds 3 --train_args "$(CIFAR_RECIPE)" \
		--correspondence_args "--num_images 2000" --device cuda --num_workers 8

# Continued pre-training on the scenes from the DINO teachers of make compare (the scenes as one's own unlabelled
# images): segmentation and correspondence on the scenes, k-NN and linear on Fashion-MNIST (FMNIST_CHECK).
CONTINUE_ARGS := $(ARCH) --out_dim 512 --head_hidden_dim 256 --head_bottleneck_dim 64 --global_crops_size 48 \
	--local_crops_size 24 --local_crops_number 2 --batch_size_per_gpu 32 --epochs 10 --teacher_temp 0.02 \
	--warmup_teacher_temp 0.02 --print_freq 500
CONTINUE_RUN := $(PY) compare.py --data_path $(SCENES) --init_from $(COMPARE) --crop_size 64 \
	--segmentation_args "--epochs 10" --device cpu --num_workers 2
FMNIST_CHECK := $(PY) compare.py --data_path $(COMPARE_DATA) --crop_size 32 --resize_size 32 --linear_lr 0.3 \
	--device cpu --num_workers 2
# The defaults of an initialised run, chosen on the holdout splits in two stages: every setting with seed 0, then
# the finalists and their combination with 2 seeds. Fresh heads (--init_heads false, as on DINO's released
# backbones); the base is the from-scratch recipe's schedule.
CONTINUE_BASE := --train_args "$(CONTINUE_ARGS) --init_heads false --lr 0.006 --warmup_epochs 3 \
	--momentum_teacher 0.99 --freeze_backbone_epochs 0"
CONTINUE_SWEEP := $(CONTINUE_BASE) --variant "lr2=--lr 0.002" --variant "lr06=--lr 0.0006" \
	--variant "lr2_f1=--lr 0.002 --freeze_backbone_epochs 1" --variant "lr06_f1=--lr 0.0006 --freeze_backbone_epochs 1" \
	--variant "lr2_w1=--lr 0.002 --warmup_epochs 1" --variant "lr06_w1=--lr 0.0006 --warmup_epochs 1" \
	--variant "lr2_m996=--lr 0.002 --momentum_teacher 0.996" --variant "lr06_m996=--lr 0.0006 --momentum_teacher 0.996"
CONTINUE_FINAL := $(CONTINUE_BASE) --variant "lr2_f1=--lr 0.002 --freeze_backbone_epochs 1" \
	--variant "lr2_w1=--lr 0.002 --warmup_epochs 1" \
	--variant "lr2_f1_w1=--lr 0.002 --freeze_backbone_epochs 1 --warmup_epochs 1"

continue-holdout: compare scenes
	$(CONTINUE_RUN) --seeds 1 --eval_split holdout --correspondence_args "--num_images 500" $(CONTINUE_SWEEP) \
		--output_dir continue_holdout
	$(FMNIST_CHECK) --seeds 1 --eval_split holdout --correspondence_args "--num_images 500" \
		--trained_in continue_holdout --output_dir continue_holdout_fmnist
	$(CONTINUE_RUN) --seeds 2 --eval_split holdout --correspondence_args "--num_images 500" $(CONTINUE_FINAL) \
		--output_dir continue_holdout_final
	$(FMNIST_CHECK) --seeds 2 --eval_split holdout --correspondence_args "--num_images 500" \
		--trained_in continue_holdout_final --output_dir continue_holdout_final_fmnist

# The experiment: the DINO teachers of make compare continued on the scenes with fresh heads (as a released
# backbone has none), the learning rate a third of the recipe's as the default is of DINO's, everything else the
# defaults of an initialised run (head warm-up 1 epoch, warm-up 3 epochs, teacher momentum 0.996).
continue-demo: compare scenes
	$(CONTINUE_RUN) --seeds 3 --correspondence_args "--num_images 1000" \
		--train_args "$(CONTINUE_ARGS) --init_heads false --lr 0.002" \
		--variant "pwself_no_head_warmup=--freeze_backbone_epochs 0" --output_dir continue_scenes
	$(FMNIST_CHECK) --seeds 3 --correspondence_args "--num_images 1000" --trained_in continue_scenes \
		--output_dir continue_fmnist

clean-demo:
	rm -rf $(DEMO)

BENCH_GPU := $(PY) bench.py --device cuda --arch vit_small --patch_size 16 --batch_size 64 --local_crops_number 8

bench-gpu: setup
	$(BENCH_GPU) --out_dim 65536 10000 --patch_loss true false --precision bf16 --num_workers 16 --json bench_gpu.json
	$(BENCH_GPU) --parts step --out_dim 65536 --fused_loss true false --precision bf16 fp32 --gpu_augment false true \
		--json bench_gpu_levers.json
	$(BENCH_GPU) --parts step --out_dim 65536 --patch_head shared separate --patch_augment false true --gpu_augment true \
		--precision bf16 --json bench_gpu_2024.json
	$(BENCH_GPU) --parts step --out_dim 65536 10000 --patch_loss true false --precision bf16 --compile true \
		--warmup 3 --steps 10 --json bench_gpu_compiled.json
