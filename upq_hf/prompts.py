"""Built-in prompt sets: instruction data without private data.

``SEED_PROMPTS`` (several hundred user prompts) are what the unquantized model answers itself to make
calibration and distillation data (``upq_hf.data.load_texts("self", ...)``). They are built
combinatorially from small topic lists crossed with task templates (explanations, how-to, lists,
stories, emails, summaries, comparisons, math word problems, coding, advice, definitions,
rewriting, classification) plus prompts carrying simple verifiable constraints ("Answer in
lowercase", "Use at most 30 words", ...). The build is deterministic: the prompts are interleaved
by a fixed-seed shuffle, so every prefix of the list (the first 64, the first 128, ...) mixes all
task kinds, and the order never changes between runs or machines.

``EVAL_PROMPTS`` (about 40 chat prompts) measure how closely a quantized model follows its teacher.
They are **disjoint from SEED_PROMPTS by construction, not only as strings**: they use other task
kinds (poems, riddles, dialogues, planning, recipes, trivia, jokes, letters of a different kind,
product copy, brain teasers, opinion questions) and other subject matter (history, geography,
cooking, travel, sport, music, mythology, ...) than any seed template or topic list. The QAT stage
trains on the teacher's answers to seed prompts; if held-out prompts shared templates or topics
with them, agreement measured on them would reward memorising the training answers rather than
following the teacher in general. ``tests/test_data.py`` checks that no eval prompt repeats a
seed prompt's opening words or comes close to one by string similarity.
"""

from __future__ import annotations

import random

# ---------------------------------------------------------------------------------------------
# topic lists (seed side)
# ---------------------------------------------------------------------------------------------

_SCIENCE = [
    "photosynthesis", "the water cycle", "a rainbow", "vaccines", "compound interest", "plate tectonics",
    "a refrigerator", "the immune system", "electric cars", "solar panels", "the greenhouse effect",
    "a computer processor", "gravity", "sound waves", "the human heart", "tides", "a search engine",
    "inflation", "public-key encryption", "the seasons", "magnets", "a microwave oven", "evolution",
    "sleep", "a battery", "clouds", "an airplane wing", "the stock market", "recycling", "GPS",
]

_HOWTO = [
    "make a good cup of tea", "change a flat bicycle tire", "start a small vegetable garden",
    "prepare for a job interview", "write a clear resume", "learn to touch type",
    "organize a cluttered closet", "keep houseplants alive", "save money on groceries",
    "fall asleep faster", "train a puppy to sit", "back up the files on my computer",
    "improve my handwriting", "clean a cast iron pan", "plan a weekly budget",
    "memorize a short speech", "set up a home workout routine", "reduce screen time",
    "make new friends in a new city", "remove a coffee stain from a shirt",
]

_LIST_THINGS = [
    ("5", "ways to save energy at home"), ("4", "fruits that are rich in vitamin C"),
    ("3", "benefits of regular exercise"), ("5", "tips for studying effectively"),
    ("6", "common mistakes new programmers make"), ("4", "reasons people keep a journal"),
    ("5", "things to pack for a camping trip"), ("3", "ways to reduce plastic waste"),
    ("4", "habits of good listeners"), ("5", "questions to ask before adopting a pet"),
    ("3", "signs that a plant needs more light"), ("4", "ways to stay focused while working from home"),
    ("5", "uses for a spreadsheet"), ("3", "advantages of learning a second language"),
    ("4", "safety rules for using a kitchen knife"),
]

_STORY_CHARS = [
    "a shy robot", "an old lighthouse keeper", "a curious cat", "a young baker", "a lost dragon",
    "a retired astronaut", "a talking tree", "a nervous student", "a clever fox", "a tiny snail",
    "a grumpy wizard", "a kind mail carrier",
]
_STORY_EVENTS = [
    "finds a mysterious key", "learns to paint", "makes an unexpected friend", "gets lost in a big city",
    "wins a competition by accident", "discovers a hidden garden", "has to solve a puzzle before sunset",
    "tries to fix a broken clock",
]

_EMAILS = [
    ("my manager", "asking for a day off next Friday"),
    ("a customer", "apologizing for a delayed order"),
    ("my landlord", "reporting a leaking faucet"),
    ("a colleague", "thanking them for their help on a project"),
    ("my teacher", "asking for an extension on an assignment"),
    ("a hotel", "asking whether they allow pets"),
    ("a new team member", "welcoming them to the team"),
    ("a friend", "inviting them to a birthday dinner"),
    ("a company", "asking about the status of my job application"),
    ("my neighbor", "asking them to keep the noise down at night"),
    ("a supplier", "requesting a price quote for 200 notebooks"),
    ("the school", "letting them know my child will be absent tomorrow"),
]

_PASSAGES = [
    "Bees play a vital role in agriculture. As they collect nectar, they carry pollen from flower to "
    "flower, which allows many crops to produce fruit. Without bees, farmers would have to pollinate "
    "many plants by hand, which would be slow and expensive.",
    "The library will extend its opening hours during the exam period. From Monday to Friday it will "
    "stay open until midnight, and on weekends it will open two hours earlier than usual. Students "
    "must show a valid card to enter after 8 pm.",
    "Regular walking has many health benefits. It strengthens the heart, helps control weight, and "
    "can improve mood. Experts suggest at least thirty minutes of brisk walking on most days of the week.",
    "Our company will switch to a new email system next month. All messages and contacts will be "
    "moved automatically over the weekend of the 14th. Employees should save any important drafts "
    "before Friday afternoon.",
    "Glass can be recycled endlessly without losing quality. Recycling one glass bottle saves enough "
    "energy to power a light bulb for several hours. However, glass must be sorted by color before "
    "it can be melted down.",
    "The town council approved a plan to build a new bike lane along the river. Construction will "
    "begin in spring and is expected to take six months. The project aims to reduce traffic and "
    "make cycling safer.",
    "Octopuses are remarkably intelligent animals. They can open jars, escape from tanks, and use "
    "coconut shells as shelters. Each of their eight arms contains neurons that can act somewhat "
    "independently.",
    "A balanced breakfast gives the body energy for the morning. Combining protein, whole grains and "
    "fruit keeps people full longer than sugary cereals, and it can help with concentration at "
    "school or work.",
    "The museum's new exhibit features tools used by ancient farmers. Visitors can try grinding "
    "grain with a stone mill and see how early irrigation channels worked. The exhibit runs until "
    "the end of the year.",
    "Many people struggle to drink enough water. Carrying a reusable bottle, adding fruit for "
    "flavor, and drinking a glass with every meal are simple ways to stay hydrated during the day.",
]

_COMPARE = [
    ("cats", "dogs as pets"), ("renting", "buying a home"), ("trains", "planes for medium-distance travel"),
    ("e-books", "printed books"), ("tea", "coffee"), ("running", "swimming as exercise"),
    ("Python", "JavaScript for beginners"), ("laptops", "desktop computers"),
    ("working from home", "working in an office"), ("savings accounts", "index funds"),
    ("wind power", "solar power"), ("a city apartment", "a house in the countryside"),
]

_NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Omar", "Elena", "Sam", "Nora"]
_ITEMS = [("apples", 0.5), ("notebooks", 2), ("pencils", 0.25), ("tickets", 12), ("cookies", 1.5),
          ("stickers", 0.2), ("plants", 4), ("candles", 3)]

_CODE_LANGS = ["Python", "JavaScript", "C", "Java", "Rust", "Go"]
_CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the largest value in a list",
    "counts the vowels in a string", "computes the factorial of a number", "removes duplicates from a list",
    "checks whether a word is a palindrome", "converts Celsius to Fahrenheit", "sums the even numbers in a list",
    "returns the n-th Fibonacci number",
]
_CODE_QUESTIONS = [
    "What is the difference between a list and a tuple in Python?",
    "What does the 'git rebase' command do?",
    "Why is my Python loop so slow when I append to a string?",
    "What is a race condition in concurrent programming?",
    "How does a hash table handle collisions?",
    "What is the difference between '==' and '===' in JavaScript?",
    "What is recursion, and when should I avoid it?",
    "What does 'Big O notation' describe?",
]

_ADVICE = [
    "is nervous about speaking in public", "wants to start running but has never exercised",
    "feels overwhelmed by a long to-do list", "is moving to a new country for work",
    "wants to read more books", "has trouble saying no to extra work", "is starting their first job",
    "wants to learn to cook healthy meals", "is preparing for a long exam", "wants to save for a holiday",
    "argued with a close friend", "keeps procrastinating on a big project",
]

_WORDS = [
    "serendipity", "resilient", "ubiquitous", "meticulous", "ephemeral", "candid", "frugal", "gregarious",
    "ambiguous", "diligent", "nostalgia", "pragmatic", "eloquent", "tenacious", "benevolent", "mundane",
]

_REWRITE_SENTENCES = [
    "hey can u send me the report asap",
    "The meeting has been moved to Thursday because many people could not attend on Tuesday.",
    "I think maybe we should possibly consider changing the plan a little bit.",
    "the food was ok but the service was really slow and the waiter forgot our drinks",
    "Our product is good and people like it and it is cheap.",
    "Due to the fact that it was raining, the game was cancelled by the organizers.",
    "i cant come to practice today sorry",
    "The results of the experiment were not what the researchers had expected them to be.",
]
_REWRITE_STYLES = ["more formal", "more friendly", "shorter", "clearer", "more polite", "more persuasive"]

_REVIEWS = [
    "The battery lasts all day and the screen is gorgeous.",
    "It broke after two days. Complete waste of money.",
    "Delivery was on time. The product is fine, nothing special.",
    "I love this blender, it makes the smoothest soups!",
    "The hotel room was dirty and the staff were rude.",
    "The book was okay, though the ending felt rushed.",
    "Best pizza in town, we will definitely come back.",
    "The app keeps crashing whenever I open the camera.",
]
_ANIMALS = ["dolphin", "penguin", "crocodile", "salmon", "butterfly", "bat", "frog", "ostrich", "shark", "beetle"]
_CLASSIFY_TEXTS = [
    "Your account has been suspended, click here to verify your password now!",
    "Hi, are we still meeting for lunch tomorrow at noon?",
    "Congratulations! You have won a free cruise, reply with your bank details.",
    "Reminder: the quarterly report is due next Monday.",
]

_CONSTRAINTS = [
    "Answer in lowercase letters only.",
    "Use at most 30 words.",
    "End your answer with the word 'done'.",
    "Use exactly 3 bullet points.",
    "Do not use any commas.",
    "Answer in all capital letters.",
    "Start your answer with the word 'Sure'.",
    "Write exactly two sentences.",
    "Include the word 'simple' at least twice.",
    "Wrap your entire answer in double quotation marks.",
    "Use at most 50 words and no bullet points.",
    "Answer with a numbered list of exactly 4 items.",
]


def _math_problems() -> list[str]:
    problems = []
    for i, name in enumerate(_NAMES):
        item, price = _ITEMS[i % len(_ITEMS)]
        n = 3 + (i * 7) % 11
        m = 2 + (i * 5) % 9
        problems.append(f"{name} buys {n} {item} at ${price} each and then buys {m} more. "
                        f"How much does {name} spend in total? Show your steps.")
        speed = 40 + 10 * (i % 5)
        hours = 2 + i % 4
        problems.append(f"A train travels at {speed} km per hour for {hours} hours and then {hours + 1} more "
                        f"hours at {speed + 20} km per hour. How far does it travel in total?")
        total = 24 + 6 * i
        frac = (2, 3, 4, 6)[i % 4]
        problems.append(f"{name} has {total} marbles and gives 1/{frac} of them to a friend. "
                        f"How many marbles does {name} have left?")
    for i, (w, h) in enumerate([(4, 7), (12, 5), (9, 9), (15, 8), (6, 11)]):
        problems.append(f"A rectangular garden is {w} meters wide and {h} meters long. What are its area and "
                        f"perimeter?")
        problems.append(f"If a shirt costs ${w * 5} and is on sale for {10 + 5 * i}% off, what is the sale price?")
    return problems


def _build_seed_prompts() -> list[str]:
    out: list[str] = []
    explain_forms = ["Explain how {t} works in simple terms.", "Why is {t} important? Explain briefly.",
                     "Can you explain {t} to a ten-year-old?"]
    for i, t in enumerate(_SCIENCE):
        out.append(explain_forms[i % 3].format(t=t))
    howto_forms = ["How do I {t}?", "What are the steps to {t}?", "Give me a step-by-step guide to {t}."]
    for i, t in enumerate(_HOWTO):
        out.append(howto_forms[i % 3].format(t=t))
    for n, things in _LIST_THINGS:
        out.append(f"List {n} {things}.")
    for i, c in enumerate(_STORY_CHARS):
        for j in range(2):
            e = _STORY_EVENTS[(i * 3 + j * 5) % len(_STORY_EVENTS)]
            out.append(f"Write a short story about {c} who {e}.")
    for who, why in _EMAILS:
        out.append(f"Write a short email to {who} {why}.")
    summary_forms = ["Summarize the following text in one sentence:\n\n{p}",
                     "Give a two-sentence summary of this paragraph:\n\n{p}",
                     "What is the main point of this text?\n\n{p}"]
    for i, p in enumerate(_PASSAGES):
        out.append(summary_forms[i % 3].format(p=p))
        out.append(summary_forms[(i + 1) % 3].format(p=p))
    for a, b in _COMPARE:
        out.append(f"Compare {a} and {b}. What are the main differences?")
    out.extend(_math_problems())
    for i, task in enumerate(_CODE_TASKS):
        for j in range(2):
            out.append(f"Write a {_CODE_LANGS[(i + 3 * j) % len(_CODE_LANGS)]} function that {task}.")
    out.extend(_CODE_QUESTIONS)
    for s in _ADVICE:
        out.append(f"What advice would you give to someone who {s}?")
    for i, w in enumerate(_WORDS):
        out.append(f"Define the word '{w}' and use it in a sentence." if i % 2 == 0
                   else f"What does '{w}' mean? Give two example sentences.")
    for i, s in enumerate(_REWRITE_SENTENCES):
        for j in range(2):
            style = _REWRITE_STYLES[(i + 2 * j) % len(_REWRITE_STYLES)]
            out.append(f"Rewrite this sentence to make it {style}: \"{s}\"")
    for r in _REVIEWS:
        out.append(f"Classify the sentiment of this review as positive, negative or neutral: \"{r}\"")
    for a in _ANIMALS:
        out.append(f"Is a {a} a mammal, bird, reptile, amphibian, fish or insect? Explain your answer.")
    for t in _CLASSIFY_TEXTS:
        out.append(f"Is the following message spam or not spam? Answer and give one reason.\n\n\"{t}\"")
    # the same kinds of task with a verifiable constraint attached
    bases = (
        [f"Explain {t}." for t in _SCIENCE[::2]]
        + [f"Describe how to {t}." for t in _HOWTO[::2]]
        + [f"Give advice to someone who {s}." for s in _ADVICE[::2]]
        + [f"Describe {a} versus {b}." for a, b in _COMPARE[::2]]
        + [f"Tell me about {c}." for c in _STORY_CHARS[::2]]
        + [f"Explain what '{w}' means." for w in _WORDS[1::3]]
    )
    for i, base in enumerate(bases):
        out.append(f"{base} {_CONSTRAINTS[i % len(_CONSTRAINTS)]}")
        if i % 3 == 0:
            out.append(f"{base} {_CONSTRAINTS[(i + 5) % len(_CONSTRAINTS)]}")
    # deterministic interleaving so that any prefix mixes every task kind
    seen: set[str] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]
    random.Random(1234).shuffle(unique)
    return unique


SEED_PROMPTS: tuple[str, ...] = tuple(_build_seed_prompts())

# ---------------------------------------------------------------------------------------------
# held-out evaluation prompts: other task kinds, other subjects (see the module docstring)
# ---------------------------------------------------------------------------------------------

EVAL_PROMPTS: tuple[str, ...] = (
    "Compose a haiku about autumn leaves falling on a quiet pond.",
    "Who was Cleopatra, and why is she remembered today?",
    "I have three days in Lisbon. Suggest an itinerary with one highlight per day.",
    "Share a recipe for a simple vegetarian lentil soup, with ingredients and steps.",
    "Here is a riddle: what has keys but cannot open locks? Tell me the answer and why.",
    "Invent a dialogue between a chess grandmaster and a beginner before their first game.",
    "What caused the fall of the Western Roman Empire? Mention two factors.",
    "Tell me a clean joke about penguins.",
    "Draft a product description for a waterproof hiking backpack.",
    "Which is the longest river in Africa, and which countries does it flow through?",
    "Describe the rules of basketball to someone who has never watched a game.",
    "Pretend you are a tour guide at the Great Wall of China and welcome a group of visitors.",
    "Which instruments make up a symphony orchestra?",
    "Translate the phrase 'good morning, how are you?' into Spanish and French.",
    "Should schools start later in the morning? Argue one side in a short paragraph.",
    "Name three Greek gods and describe what each one was known for.",
    "A farmer must cross a river with a wolf, a goat and a cabbage. How can he do it?",
    "Write a limerick about a forgetful chef.",
    "Australia's capital is not Sydney. Which city is it, and why?",
    "Plan a birthday party for a seven-year-old who loves dinosaurs.",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
    "Who painted the Mona Lisa, and what makes the painting famous?",
    "Write a thank-you note to a volunteer firefighter.",
    "Why did the Titanic sink?",
    "Suggest four board games for a family evening and say why each is fun.",
    "What should I consider when choosing a pair of running shoes?",
    "In football (soccer), when is a player offside?",
    "Write the opening paragraph of a mystery novel set on a snowy mountain train.",
    "Tell me three interesting facts about the planet Jupiter.",
    "Weather versus climate: how do meteorologists tell them apart?",
    "Create a motivational message for a team that just lost an important match.",
    "How did the printing press change Europe?",
    "Propose a name and slogan for a small bakery that specializes in sourdough bread.",
    "Is it better to learn the piano or the guitar first? Give a balanced answer.",
    "Describe a typical day in the life of a medieval blacksmith.",
    "Where on Earth can I see the Northern Lights, and what causes them?",
    "Write a four-line poem about the ocean at night that rhymes.",
    "Give a one-paragraph biography of Marie Curie.",
    "Which spices are commonly used in Indian cooking, and what do they add?",
    "If you could add one new rule to tennis, what would it be and why?",
)

#: the report split: the first 16 held-out prompts, scored by ``upq quantize``'s report, the demo and the
#: numbers in docs/BENCHMARKS.md
REPORT_PROMPTS: tuple[str, ...] = EVAL_PROMPTS[:16]
#: the validation split: the other 24 held-out prompts, on which the defaults (loss, steps, learning rates,
#: budget split) were chosen, so that the report split measures them without having picked them
VALIDATION_PROMPTS: tuple[str, ...] = EVAL_PROMPTS[16:]

__all__ = ["SEED_PROMPTS", "EVAL_PROMPTS", "REPORT_PROMPTS", "VALIDATION_PROMPTS"]
