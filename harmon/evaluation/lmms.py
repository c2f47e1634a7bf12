"""The ``harmon`` model of lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval), so that POPE, MME,
MMBench, SEED-Bench, GQA, MMMU, … run through lmms-eval's own harness:

    pip install lmms-eval            # not a dependency of this package (it pulls in a large tree)
    accelerate launch -m lmms_eval --model harmon --model_args pretrained=<pipeline folder> \\
        --tasks pope,mme,mmbench_en_dev --batch_size 1 --output_path results/

lmms-eval finds the model through this package's ``lmms_eval.models`` entry point (:func:`lmms_eval_manifest`).
Requests follow lmms-eval's *simple* model interface: ``generate_until`` requests carry ``(context, gen_kwargs,
doc_to_visual, doc_id, task, split)``, ``loglikelihood`` requests ``(context, doc_to_target, doc_to_visual,
doc_id, task, split)``; the visuals are ``doc_to_visual(self.task_dict[task][split][doc_id])``. Harmon looks at
one image per question (a request with several is refused, naming the task and document); a request without an
image is answered from the text alone.

When lmms-eval is importable :class:`HarmonLMM` subclasses its ``lmms`` base and is registered as ``"harmon"``;
otherwise it is a plain class with the same methods (what the tests here exercise: lmms-eval's dependencies are
too heavy for this project's CI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:  # lmms-eval is optional: the adapter works (and is tested) without it
    from lmms_eval.api.model import lmms as _LmmsBase
    from lmms_eval.api.registry import register_model as _register_model

    LMMS_EVAL_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    LMMS_EVAL_AVAILABLE = False

    class _LmmsBase:  # the attributes lmms-eval's base class sets and its evaluator reads
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

    def _register_model(*names):
        return lambda cls: cls


IMAGE_TOKEN = "<image>"


@_register_model("harmon")
class HarmonLMM(_LmmsBase):
    """lmms-eval's view of a :class:`~harmon.pipelines.HarmonPipeline`.

    ``pretrained``: a pipeline folder (or pass ``pipeline`` directly); ``device``/``dtype`` as for
    ``from_pretrained`` (default: this process's accelerate device, the saved dtype); ``max_new_tokens``: the
    default answer length when a task's ``gen_kwargs`` give none.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        pipeline=None,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int | str = 1,
        **unused: Any,
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        if (pretrained is None) == (pipeline is None):
            raise ValueError("HarmonLMM: give exactly one of pretrained (a pipeline folder) and pipeline")
        state = PartialState()
        if pipeline is None:
            from harmon.pipelines import HarmonPipeline

            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            pipeline = HarmonPipeline.from_pretrained(pretrained, dtype=torch_dtype).to(device or state.device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipe = pipeline
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)
        self._rank, self._world_size = state.process_index, state.num_processes

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # ------------------------------------------------------------------------------------------------ requests
    def _visual(self, doc_to_visual, doc_id, task: str, split: str):
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"HarmonLMM: task {task!r}, document {doc_id} has {len(visuals)} images; Harmon answers about one"
            )
        return visuals[0] if visuals else None

    @staticmethod
    def _question(context: str | Sequence[str]) -> str:
        context = context[0] if isinstance(context, (list, tuple)) else context
        return context.replace(IMAGE_TOKEN, "").strip()  # the pipeline places the image itself

    def _text_prompt(self, question: str, image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids of the chat prompt (the pipeline's processor) and, with an image, its understanding
        embeddings (``HarmonPipeline.image_embeddings``, as ``understand`` computes them)."""
        processor = self.pipe.processor
        if image is None:
            return torch.tensor([processor.user_turn(question)]), None
        image_embeds = self.pipe.image_embeddings([image])
        input_ids, _ = processor.understanding_inputs([question], image_embeds.shape[1])
        return input_ids, image_embeds

    def _embeddings(self, ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        from harmon.core import embed_text, splice_image_embeddings

        if image_embeds is None:
            return embed_text(self.pipe.llm, ids)
        return splice_image_embeddings(self.pipe.llm, ids, image_embeds, self.pipe.processor.image_token_id)

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy (or, with ``temperature`` > 0 / ``do_sample``, sampled) answers, cut at the first ``until``."""
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
            max_new_tokens = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            image = self._visual(doc_to_visual, doc_id, task, split)
            question = self._question(context)
            if image is not None:
                answer = self.pipe.understand(
                    image, question, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature if do_sample else 1.0, top_p=gen_kwargs.get("top_p"),
                )
            else:
                answer = self._answer_text_only(question, max_new_tokens, do_sample, temperature)
            for stop in until:
                if stop and stop in answer:
                    answer = answer.split(stop, 1)[0]
            answers.append(answer)
        return answers

    def _answer_text_only(self, question: str, max_new_tokens: int, do_sample: bool, temperature: float) -> str:
        ids, _ = self._text_prompt(question, None)
        ids = ids.to(self.device)
        generation_config = self.pipe.processor.generation_config
        generation_config.update(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True)
        if do_sample:
            generation_config.update(temperature=temperature)
        new_ids = self.pipe.llm.generate(inputs_embeds=self._embeddings(ids, None), attention_mask=torch.ones_like(ids),
                                         generation_config=generation_config)
        return self.pipe.processor.batch_decode(new_ids, skip_special_tokens=True)[0]

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, context), whether greedy decoding gives the continuation)``; the
        continuation follows the chat prompt's assistant turn (as an answer would)."""
        from harmon.core import llm_hidden_states

        results = []
        llm = self.pipe.llm
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id] if not isinstance(doc_to_target, str) else None
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            image = self._visual(doc_to_visual, doc_id, task, split)
            prompt_ids, image_embeds = self._text_prompt(self._question(context), image)
            target = self.pipe.processor.text_ids(str(continuation))
            if not target:
                raise ValueError(f"HarmonLMM: task {task!r}, document {doc_id}: the continuation is empty")
            ids = torch.cat([prompt_ids, torch.tensor([target])], dim=1).to(self.device)
            hidden = llm_hidden_states(llm, self._embeddings(ids, image_embeds)).last_hidden_state
            start = prompt_ids.shape[1]
            logits = llm.get_output_embeddings()(hidden[0, start - 1:-1]).float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(target, device=log_probs.device)
            total = float(log_probs.gather(1, targets[:, None]).sum())
            results.append((total, bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("HarmonLMM: multi-round generation is not supported")


def lmms_eval_manifest():
    """The entry point lmms-eval's model registry loads (group ``lmms_eval.models``): model id ``harmon``."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as error:
        raise ImportError("lmms_eval_manifest: lmms-eval is not installed (pip install lmms-eval)") from error
    return ModelManifest(model_id="harmon", simple_class_path="harmon.evaluation.lmms.HarmonLMM")


__all__ = ["HarmonLMM", "LMMS_EVAL_AVAILABLE", "lmms_eval_manifest"]
