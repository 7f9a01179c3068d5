"""Config schemas shared by the detection and segmentation tasks (engine-independent).

Names follow Detectron2's config keys in lower case, so that the Detectron2 engine can map them one to
one; defaults are MoCo's detection protocol (``detection/configs/Base-RCNN-C4-BN.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from pretrain.utils.config import run_setting


@dataclass(frozen=True)
class C4Config:
    """Faster R-CNN R50-C4: Detectron2's C4 defaults as MoCo uses them (names follow Detectron2's keys, lower case)."""
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_topk_train: int = 12000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    roi_resolution: int = 14
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    smooth_l1_beta: float = 0.0  # RPN and box head; 0 = L1
    extra_norm: bool = True  # MoCo's Res5ROIHeadsExtraNorm
    test_score_thresh: float = 0.05
    test_nms_thresh: float = 0.5
    test_detections_per_img: int = 100


@dataclass(frozen=True)
class InputConfig:
    """Training scale augmentation and test size (Detectron2's ``INPUT.*``); flips are horizontal."""
    min_size_train: List[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisible: int = 1  # Detectron2's ResNet C4 backbone: size_divisibility 0, pad only to the batch max
    hflip_prob: float = 0.5


@dataclass(frozen=True)
class SolverConfig:
    batch_size: int = 16  # total over all processes (Detectron2's IMS_PER_BATCH)
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # Detectron2's SOLVER.WEIGHT_DECAY_NORM default
    iterations: int = 24000
    steps: List[int] = field(default_factory=lambda: [18000, 22000])
    gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    # a resumable checkpoint every this many iterations (Detectron2's SOLVER.CHECKPOINT_PERIOD default); resuming is
    # exact, so it is not part of a result's protocol
    checkpoint_period: int = run_setting(5000)


@dataclass(frozen=True)
class PreciseBNConfig:
    enabled: bool = True
    num_iters: int = 200


@dataclass(frozen=True)
class PrecisionConfig:
    """GPU speed switches (ignored on CPU). Off by default: the paper's numbers are fp32 NCHW, and both
    switches are part of a result's protocol identity, so runs with and without them never average."""
    amp_bf16: bool = False  # bf16 autocast for the forward pass (losses are summed in fp32)
    channels_last: bool = False


@dataclass(frozen=True)
class FPNConfig:
    """R50-FPN R-CNN: Detectron2's ``Base-RCNN-FPN.yaml`` with MoCo's norm policy (issue #34: BN trained and
    synchronised in backbone and FPN only; heads without norm). Names follow Detectron2's keys, lower case."""
    out_channels: int = 256  # FPN.OUT_CHANNELS
    # RESNETS.NORM: "SyncBN" (trained, synchronised: MoCo's rows) or "FrozenBN" (statistics and affine fixed at
    # the pretrained values, all else trained: the supervised LVIS row of MoCo Table 6, its dagger)
    backbone_norm: str = "SyncBN"
    fpn_norm: str = "SyncBN"  # FPN.NORM: "SyncBN" (BN synchronised over processes, plain BN on one) or ""
    # one anchor size per level p2..p6 (ANCHOR_GENERATOR.SIZES), three ratios on every level
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_topk_train: int = 2000  # per FPN level
    rpn_post_nms_topk_train: int = 1000  # per image (Detectron2's FPN configs)
    rpn_pre_nms_topk_test: int = 1000  # per FPN level
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_smooth_l1_beta: float = 0.0  # RPN.SMOOTH_L1_BETA
    box_pooler_resolution: int = 7  # ROI_BOX_HEAD.POOLER_RESOLUTION (ROIAlignV2, sampling ratio 0)
    box_num_fc: int = 2  # FastRCNNConvFCHead: 2 x FC-1024, no norm
    box_fc_dim: int = 1024
    box_smooth_l1_beta: float = 0.0  # ROI_BOX_HEAD.SMOOTH_L1_BETA (0.5 for keypoints)
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    test_score_thresh: float = 0.05
    test_nms_thresh: float = 0.5
    test_detections_per_img: int = 100


@dataclass(frozen=True)
class MaskHeadConfig:
    """Detectron2's ``MaskRCNNConvUpsampleHead``: ``num_conv`` 3x3 convs, a 2x2 stride-2 deconv, a 1x1
    predictor per class. FPN: 4 convs on a 14x14 RoIAlignV2 (28x28 masks). C4: no convs on the res5 RoI
    features the box head computed (7x7 -> 14x14 masks); ``pooler_resolution`` is then the box pooler's."""
    num_conv: int = 4
    conv_dim: int = 256
    pooler_resolution: int = 14


@dataclass(frozen=True)
class KeypointHeadConfig:
    """Detectron2's ``KRCNNConvDeconvUpsampleHead``: 8 x conv 3x3-512 on a 14x14 RoIAlignV2, a 4x4 stride-2
    deconv and a x2 bilinear upsampling (56x56 heatmaps); loss normalised by the visible keypoints."""
    num_keypoints: int = 17
    conv_dims: List[int] = field(default_factory=lambda: [512] * 8)
    pooler_resolution: int = 14
    min_keypoints_per_image: int = 1  # ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE (training images)
