"""Natural-language descriptions of the study's seven tasks, for Text-to-LoRA (src/t2l.py): each
`Task` of src/tasks.py carries its own (`Task.descriptions`; these are the seven's), and the
functions below read them from there, so a new task brings its descriptions in its `Task(...)`.

Written for this project, with varied wording, and none copies a prompt template. Each task
has 12. The first `N_TRAIN` are used for training. The rest are held out: evaluation
generates each task's adapter from its first held-out description.
"""
from __future__ import annotations

from src.errors import UserError

N_TRAIN = 9

DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "summarization": (
        "Condense a news article into a few sentences that keep its main facts.",
        "Read a long report and write a short summary of what happened.",
        "Produce a brief overview of a newspaper story, leaving out minor details.",
        "Shorten an article to its key points in plain prose.",
        "Write the highlights of a news piece as a compact paragraph.",
        "Give a concise digest of the events described in a text.",
        "Boil a lengthy story down to the essentials a reader must know.",
        "Create an abstract-like summary for a journalistic article.",
        "Tell me in two or three sentences what this news text is about.",
        "Sum up the article so that someone in a hurry gets the gist.",
        "Compress a document into a short synopsis of its most important information.",
        "Extract the core message of a news report and restate it briefly.",
    ),
    "translation": (
        "Translate a sentence from English into German.",
        "Render English text faithfully in fluent German.",
        "Convert an English passage into its German equivalent.",
        "Produce a German version of a sentence written in English.",
        "Act as an English-to-German translator for short texts.",
        "Rewrite this English input in natural, correct German.",
        "Turn English sentences into German while keeping their meaning.",
        "Give the German translation of a line of English.",
        "Map text in the English language to the same content in German.",
        "Translate into Deutsch, preserving names and numbers.",
        "Express what an English sentence says, but in German.",
        "Provide an accurate German rendering of English source text.",
    ),
    "qa": (
        "Answer a question using a span copied from a given paragraph.",
        "Read a passage and reply to a question about it with a short phrase from the text.",
        "Find the words in the context that answer the question.",
        "Extract the answer to a reading-comprehension question from the provided text.",
        "Given some background text, respond to a factual question with the relevant snippet.",
        "Locate and return the part of a paragraph that answers what is asked.",
        "Do extractive question answering over a Wikipedia paragraph.",
        "Reply briefly to a question whose answer appears verbatim in the passage.",
        "Use the supplied context to pull out the exact answer to a query.",
        "Answer who, what, when or where questions from an accompanying article.",
        "Pick out the shortest piece of the text that correctly answers the question.",
        "Respond to a comprehension question by quoting the answer from the context.",
    ),
    "sentiment": (
        "Decide whether a movie review is positive or negative.",
        "Classify the opinion in a short review as favourable or unfavourable.",
        "Tell if the writer of this film critique liked the movie.",
        "Label the emotional tone of a sentence as positive or negative.",
        "Judge the polarity of a review: praise or criticism?",
        "Determine if a comment expresses approval or disapproval.",
        "Say whether the reviewer's feeling about the film is good or bad.",
        "Perform binary sentiment classification on movie reviews.",
        "Read a review snippet and output its sentiment.",
        "Is this text happy about the film or disappointed by it? Answer with the sentiment.",
        "Detect whether the attitude in a sentence is positive or negative.",
        "Categorise a piece of movie criticism by the sentiment it conveys.",
    ),
    "nli": (
        "Decide whether a premise entails, contradicts, or is neutral towards a hypothesis.",
        "Given two sentences, say if the second follows from the first.",
        "Classify the logical relation between a premise and a hypothesis.",
        "Determine if a statement is implied by, opposed to, or unrelated to another.",
        "Perform natural language inference on a pair of sentences.",
        "Tell whether the hypothesis must be true, must be false, or may be either given the premise.",
        "Judge if one sentence supports or contradicts a second one.",
        "Label a sentence pair as entailment, neutral or contradiction.",
        "Check whether a claim can be inferred from a given statement.",
        "Reason about whether the second sentence is consistent with the first.",
        "Assess the inferential relationship between two short texts.",
        "Say if a conclusion is guaranteed, ruled out, or left open by a premise.",
    ),
    "paraphrasing": (
        "Rewrite a sentence in different words without changing its meaning.",
        "Restate the given sentence so that it says the same thing another way.",
        "Produce a paraphrase of a sentence.",
        "Reword a statement while keeping all of its information.",
        "Say the same thing as the input sentence, phrased differently.",
        "Generate an alternative formulation of a sentence with identical meaning.",
        "Rephrase the text, for example by reordering clauses, but keep the facts.",
        "Write a sentence that means exactly what the original one means.",
        "Give another version of this sentence that a reader would find equivalent.",
        "Recast a sentence in new wording that preserves its content.",
        "Offer a faithful rewording of a short piece of text.",
        "Transform a sentence into an equivalent one with a different structure.",
    ),
    "commonsense": (
        "Pick which of two solutions achieves an everyday physical goal.",
        "Given a goal and two ways to reach it, choose the one that would actually work.",
        "Use physical common sense to select the better of two procedures.",
        "Decide how to accomplish a practical task: which proposed method is sensible?",
        "Choose the correct way to do a household chore from two candidates.",
        "Reason about objects and tools to say which of two instructions succeeds.",
        "Select the plausible solution to a simple real-world problem.",
        "Answer a two-choice question about how to get something done physically.",
        "Judge which of two suggested actions a sensible person would take to reach the goal.",
        "Tell apart a workable method from an impractical one for a stated aim.",
        "Copy out the solution that is consistent with how everyday objects behave.",
        "Identify the right approach to a hands-on task among two options.",
    ),
}


def descriptions_of(task: str) -> tuple[str, ...]:
    """Every description of `task` (its `Task.descriptions`); a task without any is refused in one line."""
    from src.tasks import TASKS
    found = TASKS[task].descriptions if task in TASKS else ()
    if not found:
        having = [t.name for t in TASKS.values() if t.descriptions]
        raise UserError(f"Text-to-LoRA needs descriptions of task {task}: its Task(...) in src/tasks.py has none "
                        f"(descriptions=, 12 of them: docs/tasks.md, 'Adding a task'); tasks with descriptions: "
                        f"{', '.join(having)}")
    return found


def training_descriptions(task: str) -> tuple[str, ...]:
    """The descriptions Text-to-LoRA trains on (the first N_TRAIN)."""
    return descriptions_of(task)[:N_TRAIN]


def held_out_descriptions(task: str) -> tuple[str, ...]:
    """The descriptions kept out of training: validation, and evaluation's (the first of them)."""
    return descriptions_of(task)[N_TRAIN:]
