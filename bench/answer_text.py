"""Answer-text scoring: zero-shot accuracy of the base model by letter and by answer text, and
the speed of the shared-prompt mask against a prompt KV cache expanded per option.

    .venv/bin/python bench/answer_text.py zero-shot --task arce --questions 200
    .venv/bin/python bench/answer_text.py speed --questions 64 --members 5

``zero-shot`` scores the base model (no adapters) on a random subset of the task's eval split
(``DataConfig(eval_limit=..., subset_seed=0)``, the subset ``loraens train`` would evaluate on)
in fp32, once by letter (the paper's prompt) and once per answer-text normalisation.

``speed`` times one inference pass over the same questions with M stacked members, two ways:

* **mask** (what loraens ships): each question is one segment, prompt then every option, under a
  4-D attention mask (options see the prompt and themselves), packed several per row;
* **cache**: the prompts alone (left-padded) with ``use_cache``, the KV cache repeated K times
  (``DynamicCache.batch_repeat_interleave``), then every option (right-padded to the longest)
  in a second forward over that cache.

Both compute the same option log-likelihoods (checked), so only the time differs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from loraens.baselines.few_shot import base_model_as_ensemble
from loraens.config import DataConfig
from loraens.data.prompts import encode_questions, label_token_ids
from loraens.data.sources import load_run_data
from loraens.evaluation.inference import score_members
from loraens.evaluation.metrics import summarize
from loraens.models.loading import load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import target_log_probs
from loraens.runtime import Runtime

FP32 = Runtime(device=torch.device("cpu"), autocast_dtype=None)


def zero_shot(args) -> None:
    base = load_base_model()
    _, questions = load_run_data(DataConfig(task=args.task, eval_limit=args.questions))
    labels = np.asarray([q.answer for q in questions])
    label_ids = torch.tensor(
        label_token_ids(base.tokenizer, max(len(q.choices) for q in questions))
    )
    modes = [("letter", "none")] + [("answer_text", n) for n in ("none", "per_token", "per_char")]
    print(f"{args.task}: {len(questions)} eval questions, zero-shot, fp32")
    with base_model_as_ensemble(base.model) as ensemble:
        for scoring, normalization in modes:
            tick = time.perf_counter()
            encoded = encode_questions(base.tokenizer, questions, 512, scoring, normalization)
            log_p = score_members(ensemble, encoded, label_ids, FP32)[0]
            metrics = summarize(log_p, labels)
            print(
                f"  {scoring:<12}{normalization:<10} accuracy {metrics['accuracy']:.3f}  "
                f"nll {metrics['nll']:.3f}  ece {metrics['ece']:.3f}  "
                f"({time.perf_counter() - tick:.1f} s)"
            )


def cache_scores(ensemble: LoRAEnsemble, encoded, batch: list[int], n_members: int):
    """(members, questions, K_max) option log-likelihoods through an expanded prompt cache."""
    model, options = ensemble.model, encoded.options
    k_max = max(encoded.n_choices)
    prompts, option_ids = [], []
    for i in batch:
        ids, lengths = encoded.input_ids[i], options.lengths[i]
        start = len(ids) - sum(lengths)
        prompts.append(ids[:start])
        cuts = np.cumsum([start, *lengths])
        per_option = [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        option_ids.append(per_option + [[0]] * (k_max - len(per_option)))
    p_max = max(map(len, prompts))
    rows = len(batch) * n_members
    input_ids = torch.zeros((len(batch), p_max), dtype=torch.long)
    mask = torch.zeros((len(batch), p_max), dtype=torch.long)
    for r, ids in enumerate(prompts):  # left padding: the cache ends where options begin
        input_ids[r, p_max - len(ids) :] = torch.tensor(ids)
        mask[r, p_max - len(ids) :] = 1
    input_ids, mask = input_ids.repeat(n_members, 1), mask.repeat(n_members, 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k_max)
    flat = [o for per_q in option_ids for o in per_q] * n_members
    l_max = max(map(len, flat))
    opt_ids = torch.zeros((rows * k_max, l_max), dtype=torch.long)
    opt_mask = torch.zeros((rows * k_max, l_max), dtype=torch.long)
    for r, ids in enumerate(flat):
        opt_ids[r, : len(ids)] = torch.tensor(ids)
        opt_mask[r, : len(ids)] = 1
    prompt_len = mask.sum(1).repeat_interleave(k_max)
    opt_pos = prompt_len[:, None] + torch.arange(l_max)[None, :]
    full_mask = torch.cat([mask.repeat_interleave(k_max, 0), opt_mask], dim=1)
    hidden = decoder(
        input_ids=opt_ids, attention_mask=full_mask, position_ids=opt_pos, cache=cache
    ).last_hidden_state
    first = out.last_hidden_state[:, -1].repeat_interleave(k_max, 0)
    states = torch.cat([first[:, None], hidden[:, :-1]], dim=1)[opt_mask.bool()]
    lp = target_log_probs(model, states, opt_ids[opt_mask.bool()])
    sums = torch.zeros(rows * k_max).index_add(
        0, torch.arange(rows * k_max).repeat_interleave(opt_mask.sum(1)), lp
    )
    return sums.view(n_members, len(batch), k_max)


def speed(args) -> None:
    base = load_base_model()
    _, questions = load_run_data(DataConfig(task=args.task, eval_limit=args.questions))
    encoded = encode_questions(base.tokenizer, questions, 512, "answer_text")
    ensemble = LoRAEnsemble(base.model, args.members)
    ensemble.init_members(range(args.members))
    batch = list(range(len(questions)))
    with torch.inference_mode():
        for name in ("mask", "cache", "mask", "cache"):  # second round: warm
            tick = time.perf_counter()
            if name == "mask":
                log_p = score_members(
                    ensemble, encoded, torch.tensor([]), FP32, batch_size=len(batch)
                )
            else:
                sums = cache_scores(ensemble, encoded, batch, args.members).double().numpy()
            print(f"  {name:<6}{time.perf_counter() - tick:6.2f} s")
    n = np.asarray(encoded.n_choices)
    valid = np.arange(sums.shape[2])[None, :] < n[:, None]
    layout_free = np.where(valid, sums, -np.inf)
    expected = layout_free - np.logaddexp.reduce(layout_free, axis=2, keepdims=True)
    print("  max |difference| of log p_T:", float(np.abs(log_p - expected)[:, valid].max()))
    tokens = sum(len(ids) for ids in encoded.input_ids)
    print(f"{len(questions)} questions, M = {args.members}, {tokens} segment tokens per member")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["zero-shot", "speed"])
    parser.add_argument("--task", default="arce")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (zero_shot if args.what == "zero-shot" else speed)(args)


if __name__ == "__main__":
    main()
