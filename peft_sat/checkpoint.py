"""What a saved SAT checkpoint tells whoever loads it: ``import peft_sat`` first.

PEFT looks up the ``"peft_type": "SAT"`` of ``adapter_config.json`` in its method registry, which knows SAT only
after ``import peft_sat``; without it ``PeftModel.from_pretrained`` fails with a bare ``KeyError: 'SAT'``. peft_sat
cannot change PEFT, so ``SATConfig.save_pretrained`` writes the hint where a reader looks: a ``"_comment"`` key in
``adapter_config.json`` (``SATConfig`` accepts and drops it when loading, so PEFT's loaders neither fail nor warn
about an unknown key) and a section of the model card, the ``README.md`` that ``PeftModel.save_pretrained`` writes
into the same folder just before the config.
"""

from __future__ import annotations

import json
import os

from peft.utils import CONFIG_NAME

LOADING_NOTE_KEY = "_comment"  # the JSON comment idiom; sorted first among PEFT's lower-case keys
LOADING_NOTE = (
    "Saved by peft_sat (Sparsity-Accelerated Training, PEFT type 'SAT'). Run `import peft_sat` before "
    "`PeftModel.from_pretrained`: the import registers the method, without it PEFT raises KeyError: 'SAT'."
)
MODEL_CARD_NOTE = """## Loading with peft_sat

This checkpoint was trained with peft_sat (Sparsity-Accelerated Training, PEFT type `SAT`). Import `peft_sat`
before loading it, or PEFT fails with `KeyError: 'SAT'`:

```python
import peft_sat  # registers the PEFT method "sat"
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```
"""


def add_loading_note(save_directory: str | os.PathLike) -> None:
    """Add the loading note to ``adapter_config.json`` in ``save_directory``, and to its ``README.md`` when there is one.

    Idempotent: saving again into the same folder does not repeat the model card section.

    Example:
        >>> SATConfig().save_pretrained("out")  # doctest: +SKIP  (calls add_loading_note("out"))
    """
    path = os.path.join(save_directory, CONFIG_NAME)
    with open(path) as file:
        values = json.load(file)
    values[LOADING_NOTE_KEY] = LOADING_NOTE
    with open(path, "w") as file:
        file.write(json.dumps(values, indent=2, sort_keys=True))  # PEFT's own layout
    card = os.path.join(save_directory, "README.md")
    if not os.path.isfile(card):  # a config saved on its own: no model card to complete
        return
    with open(card, encoding="utf-8") as file:
        text = file.read()
    if MODEL_CARD_NOTE.splitlines()[0] not in text.splitlines():  # its heading: PEFT re-saves the card reformatted
        with open(card, "w", encoding="utf-8") as file:
            file.write(f"{text.rstrip()}\n\n{MODEL_CARD_NOTE}")
