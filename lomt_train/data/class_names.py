"""Class, part and attribute names of the datasets, in the order their files number them."""

from __future__ import annotations

# NYU-v2 40-class labels (Gupta et al., CVPR 2013). Label file value ``i`` (1..40) is
# ``NYU40_CLASS_NAMES[i - 1]``; 0 is void. "refridgerator" is spelt as in the release.
NYU40_CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip

# NYU-v2 13-class labels (Couprie et al. 2013), as numbered by the MTAN / LibMTL arrays (0..12).
NYU13_CLASS_NAMES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
    "table", "tv", "wall", "window",
)  # fmt: skip

# The 18 annotated parts of CelebAMask-HQ in the release's own order (its g_mask.py paints
# them in this order, later parts over earlier ones). With the background they make the
# release's 19 classes, CELEBAMASK_CLASS_NAMES.
CELEBAMASK_PARTS: tuple[str, ...] = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
    "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
CELEBAMASK_CLASS_NAMES: tuple[str, ...] = ("background", *CELEBAMASK_PARTS)

# The papers' 3-class face segmentation; see celeba.PART_TO_CLASS3 for how parts map onto it.
CELEBA_SEG_CLASS_NAMES: tuple[str, ...] = ("background", "hair", "skin")

# The 40 CelebA attributes in the column order of CelebAMask-HQ-attribute-anno.txt.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
