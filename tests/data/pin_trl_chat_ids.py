"""Write tests/data/fixtures/trl_chat_ids.json: TRL's token ids of the conversational test
rows, for each tokenizer family, so the tests compare against them without TRL.

    .venv/bin/python tests/data/pin_trl_chat_ids.py      (with trl==1.16.0 installed)
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from chat_cases import FIXTURE, chat_groups, trl_chat_ids  # noqa: E402
from conftest import build_tokenizer_kinds  # noqa: E402

if __name__ == "__main__":
    import trl

    pinned = {"trl": trl.__version__, "ids": {}}
    for kind, tokenizer in build_tokenizer_kinds().items():
        pinned["ids"][kind] = {group: trl_chat_ids(tokenizer, rows)
                               for group, rows in chat_groups(kind).items()}
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(pinned, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} (trl {trl.__version__})")
