"""Knowledge distillation: the loss a student pays for differing from a teacher's logits, and
the teacher a step distils from.

Used by the `distill` fine-tuning method (recovery after structural cuts) and by elastic
training, where every sub-network learns from the largest one's logits (in-place
distillation).
"""

from __future__ import annotations

from .errors import InputError


def distillation_loss(student, teacher, labels=None, *, alpha: float = 0.5,
                      temperature: float = 1.0, causal: bool = False):
    """(1 - alpha) * cross-entropy with the labels + alpha * T^2 * KL(teacher_T || student_T).

    `student` / `teacher`: logits, (batch, classes) or for a causal LM (batch, tokens, vocab)
    with `labels` the input ids (-100 where no token is scored), shifted by one as the model's
    own loss does. Without labels (or alpha = 1) only the distillation term is taken. The KL
    term is averaged over the scored positions; T^2 keeps its gradient's scale independent of
    the temperature (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    teacher = teacher.detach().to(student.dtype)
    if causal:
        student, teacher = student[..., :-1, :], teacher[..., :-1, :]
        labels = labels[..., 1:] if labels is not None else None
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.reshape(-1, teacher.shape[-1])
    if labels is not None:
        labels = labels.reshape(-1)
        scored = labels != -100
        student, teacher, labels = student[scored], teacher[scored], labels[scored]
    log_p = F.log_softmax(student / temperature, -1)
    log_q = F.log_softmax(teacher / temperature, -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature ** 2
    if labels is None or alpha >= 1:
        return kl
    return alpha * kl + (1 - alpha) * F.cross_entropy(student, labels)


def logits_of(output):
    """The logits of a model's output (a ModelOutput, or a dict from mmkit's CLIP wrapper)."""
    return output["logits"]


def load_teacher(ref: str | None, ctx, student):
    """The teacher a step distils from: the model `ref` names (a step's `teacher`), else the
    model the run started from (`ctx.origin`, before any cut). It must have the student's
    task, labels and tokenizer; it is returned in eval mode on the student's device."""
    from .loading import LoadedModel, load_model

    origin = ctx.models[ref] if ref else ctx.origin
    if origin is None:
        raise InputError("Distillation needs a teacher: name one with --teacher (a fine-tuned "
                         "model of the same task), or distil inside a recipe whose input model "
                         "is the teacher.")
    teacher = origin if isinstance(origin, LoadedModel) else load_model(
        origin, student.task, student.labels, device=ctx.device, seed=ctx.seed)
    where = f"the teacher '{ref}'" if ref else "the teacher (the run's input model)"
    if teacher.fresh_head or (student.labels and teacher.labels != student.labels):
        labels = ", ".join(list(map(str, student.labels or []))[:6])
        raise InputError(f"{where} has no trained head for the student's labels ({labels}); a "
                         "teacher must be fine-tuned on the same task. Name one with --teacher.")
    _check_inputs_match(teacher, student, where)
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    return teacher


def _check_inputs_match(teacher, student, where: str) -> None:
    """Teacher and student must read the same inputs (one tokenizer / image size)."""
    t, s = teacher.tokenizer, student.tokenizer
    if t is not None and s is not None:
        sample = "Distillation feeds the teacher the student's tokens: 1, 2, 3."
        if t.get_vocab() != s.get_vocab() or t(sample)["input_ids"] != s(sample)["input_ids"]:
            raise InputError(f"{where} uses another tokenizer than the student; distillation "
                             "feeds both the same tokens. Use a teacher of the same family.")
    def size(loaded):
        config = loaded.model.config
        return getattr(getattr(config, "vision_config", config), "image_size", None)

    if size(teacher) != size(student):
        raise InputError(f"{where} reads {size(teacher)}-pixel images and the student "
                         f"{size(student)}; use a teacher with the student's image size.")
