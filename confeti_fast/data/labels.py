"""The 19-class Cityscapes label space and the id tables of the three datasets (docs/method.md §1)."""
import numpy as np

IGNORE_INDEX = 255

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASSES)

# Cityscapes labelId (GTA5 uses the same ids) of each trainId.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# SYNTHIA-RAND-CITYSCAPES id of each trainId; None where SYNTHIA has no such class.
SYNTHIA_IDS = (3, 4, 2, 21, 5, 7, 15, 9, 6, None, 1, 10, 17, 8, None, 19, None, 12, 11)

# trainIds evaluated for SYNTHIA: 16 classes, and the 13 of mIoU* (no wall, fence, pole).
SYNTHIA_16_CLASSES = tuple(i for i, s in enumerate(SYNTHIA_IDS) if s is not None)
SYNTHIA_13_CLASSES = tuple(i for i in SYNTHIA_16_CLASSES if i not in (3, 4, 5))

# Things (docs/method.md §3 step 6, feature distance): traffic light, sign, person .. bicycle.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# Cityscapes colour palette, by trainId.
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)


def _lookup(ids_by_train_id, size):
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for train_id, dataset_id in enumerate(ids_by_train_id):
        if dataset_id is not None:
            table[dataset_id] = train_id
    return table


# Lookup tables from a dataset id to a trainId; every id not listed maps to 255.
CITYSCAPES_TO_TRAIN_ID = _lookup(CITYSCAPES_LABEL_IDS, 256)
SYNTHIA_TO_TRAIN_ID = _lookup(SYNTHIA_IDS, 65536)  # SYNTHIA labels are 16-bit


def cityscapes_to_train_ids(label_ids):
    """Map a Cityscapes/GTA5 labelId array (uint8) to trainIds."""
    return CITYSCAPES_TO_TRAIN_ID[label_ids]


def synthia_to_train_ids(synthia_ids):
    """Map a SYNTHIA class-id array (up to 16-bit) to trainIds."""
    return SYNTHIA_TO_TRAIN_ID[synthia_ids]


def train_ids_to_label_ids(train_ids):
    """Map trainIds back to Cityscapes labelIds (for the official evaluation); 255 -> 0."""
    table = np.zeros(256, dtype=np.uint8)
    table[:NUM_CLASSES] = CITYSCAPES_LABEL_IDS
    return table[train_ids]


def colorize(train_ids):
    """An RGB picture of a trainId map in the Cityscapes palette (ignored pixels black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    return table[train_ids]
