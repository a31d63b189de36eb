"""``engine bench official`` against a stand-in for facebookresearch/coconut's ``coconut.py``.

The official file is not part of this project, so the test writes its own ``Coconut``
class with the same constructor and ``generate`` signature, implemented as plainly as the
official one: every continuous thought replaces its ``<|latent|>`` placeholder with the
last hidden state of the position before it, recomputing the whole prefix; every answer
token is a forward over the whole sequence so far. It shares no code with the engine, so
the bench's "answers equal to the official's" must come out at 100% for the engine's
answers to be right, and the layout of the official input (prompt, placeholders, <eot>)
is what the stand-in checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

STAND_IN = '''
import torch

class Coconut(torch.nn.Module):
    def __init__(self, base_causallm, latent_token_id, start_latent_id, end_latent_id, eos_token_id):
        super().__init__()
        self.base_causallm = base_causallm
        self.latent_token_id, self.start_latent_id = latent_token_id, start_latent_id
        self.end_latent_id, self.eos_token_id = end_latent_id, eos_token_id
        self.embedding = base_causallm.get_input_embeddings()

    def generate(self, input_ids, attention_mask, max_new_tokens=16, **kwargs):
        assert input_ids.shape[0] == 1
        ids = input_ids[0].tolist()
        latents = [i for i, t in enumerate(ids) if t == self.latent_token_id]
        assert latents and ids[latents[0] - 1] == self.start_latent_id, "a thought follows <bot>"
        assert ids[latents[-1] + 1] == self.end_latent_id, "<eot> follows the last thought"
        embeds = self.embedding(input_ids)
        for position in latents:
            out = self.base_causallm(inputs_embeds=embeds[:, :position], output_hidden_states=True)
            embeds = embeds.clone()
            embeds[0, position] = out.hidden_states[-1][0, -1]
        tokens = list(ids)
        for _ in range(max_new_tokens):
            logits = self.base_causallm(inputs_embeds=embeds).logits
            token = int(torch.argmax(logits[0, -1]))
            if token == self.eos_token_id:
                break
            tokens.append(token)
            embeds = torch.cat([embeds, self.embedding(torch.tensor([[token]]))], dim=1)
        return torch.tensor([tokens])
'''


def test_engine_answers_as_the_official_generate(tmp_path, gpt2_checkpoint):
    model = tmp_path / "model"
    shutil.copytree(gpt2_checkpoint, model)
    questions = [f"question {i} about the words in a corpus" for i in range(5)]
    (model / "test.json").write_text(json.dumps([{"question": q, "answer": "", "steps": []} for q in questions]))
    official = tmp_path / "coconut.py"
    official.write_text(STAND_IN)
    out = tmp_path / "official.json"
    done = subprocess.run([sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())", "bench", "official",
                           "--official", str(official), "--model", str(model), "--questions", "5",
                           "--concurrency", "1,3", "--max-tokens", "6", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["questions"] == 5 and report["thoughts"] >= 1
    assert report["official"]["requests_per_s"] > 0
    for level in ("1", "3"):
        assert report["engine"][level]["same_answers"] == 1.0
        assert report["engine"][level]["over_official"] > 0
    assert "answers equal to the official's: 100%" in done.stdout


def test_a_missing_official_file_says_where_to_get_it(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())", "bench", "official",
                           "--official", str(tmp_path / "nope.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "facebookresearch/coconut" in done.stderr
