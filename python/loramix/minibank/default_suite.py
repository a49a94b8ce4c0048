"""The default mini-bank suite: 9 families x 6 tasks, as data (format: see ``suite.py``).

Design, so that mixing a held-out task's relatives helps it (the paper's premise):
- a family = one operation on one vocabulary domain; its tasks share both and differ in
  instruction wording, a task-specific 75 % subset of the vocabulary and list lengths, so a
  family's adapters are related (and token histograms put them close together) while families
  differ in operation *and* vocabulary;
- the base model is pre-trained on the same prompt format with other operations (copy, first,
  count, contains) in plain words, on the suite's operations as latent skills cued only by opaque
  rule numbers ("Apply rule 13."), and on fact sentences for the two lexicons: it knows the format,
  the skills and the facts but no task instruction, so it fails the tasks until an adapter maps
  the task's instruction onto the skill (a first build without the latent skills gave task
  adapters that barely learnt the operations at this scale: Rouge-L 0.38 on "last item");
- answers are one to a few words, so Rouge-L is meaningful.
"""
from __future__ import annotations

_FRUITS = ("apple banana cherry grape lemon mango melon orange peach pear plum kiwi lime papaya "
           "apricot fig guava berry coconut olive").split()
_ANIMALS = ("horse tiger zebra camel rabbit wolf eagle shark whale otter beaver goat sheep lion "
            "monkey panda koala moose bison parrot").split()
_COLORS = ("red blue green yellow purple pink brown black white gray silver gold violet cyan "
           "magenta beige maroon navy teal amber").split()
_NUMBERS = [str(n) for n in (11, 13, 17, 19, 23, 28, 31, 36, 42, 47, 53, 58, 61, 64, 72, 77, 81,
                             86, 93, 99)]
_TOOLS = ("hammer wrench drill saw chisel pliers shovel rake ladder axe screwdriver file clamp "
          "level brush trowel sander mallet spanner crowbar").split()
_CITIES = ("paris london tokyo berlin madrid rome cairo lima oslo vienna dublin prague lisbon "
           "seoul delhi sydney boston chicago denver austin").split()
_INSTRUMENTS = ("piano violin guitar flute drum trumpet cello harp banjo organ oboe tuba "
                "clarinet bugle lute sitar ukulele viola horn bell").split()
_MISC = ("table chair window door book pencil paper lamp cup plate spoon fork bottle box bag "
         "shoe coat hat key phone clock mirror carpet pillow blanket bucket rope candle basket "
         "river mountain cloud stone").split()

_ANTONYM_PAIRS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
                  ("light", "dark"), ("tall", "short"), ("rich", "poor"), ("early", "late"),
                  ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"), ("young", "old"),
                  ("strong", "weak"), ("full", "empty"), ("open", "closed"), ("clean", "dirty"),
                  ("thick", "thin"), ("heavy", "light"), ("wide", "narrow"), ("deep", "shallow"),
                  ("sharp", "dull"), ("brave", "afraid"), ("cheap", "costly"), ("near", "far"),
                  ("sweet", "sour"), ("smooth", "rough"), ("calm", "angry"), ("high", "low"),
                  ("true", "false"), ("first", "last")]
_ANTONYMS = {}
for _a, _b in _ANTONYM_PAIRS:
    _ANTONYMS.setdefault(_a, _b)
    _ANTONYMS.setdefault(_b, _a)

_FOOD_GROUPS = {
    **dict.fromkeys("carrot potato onion spinach cabbage pepper celery radish turnip lettuce".split(), "vegetable"),
    **dict.fromkeys("rice wheat oats barley corn millet rye quinoa bread pasta".split(), "grain"),
    **dict.fromkeys("milk cheese butter yogurt cream".split(), "dairy"),
    **dict.fromkeys("beef pork chicken turkey lamb bacon ham sausage".split(), "meat"),
    **dict.fromkeys("salmon tuna cod shrimp crab lobster sardine trout".split(), "seafood"),
    **dict.fromkeys("cake cookie candy toffee fudge honey syrup pudding".split(), "sweet"),
}


def _family(name, op, instructions, *, n_items=(3, 5), subset=0.75, **kw):
    lens = [list(n_items), [n_items[0], n_items[1] + 1], [n_items[0] + 1, n_items[1] + 1]]
    tasks = [{"name": f"{name}_{i + 1}", "instruction": ins, "n_items": lens[i % 3]}
             for i, ins in enumerate(instructions)]
    return {"name": name, "op": op, "subset": subset, "tasks": tasks, **kw}


SUITE = {
    "name": "default",
    "version": 1,
    "seed": 2507_01806,
    "prompt": "{instruction}\nInput: {input}\nOutput:",
    "splits": {"train": 320, "valid": 32, "test": 48},
    "vocabularies": {"fruits": _FRUITS, "animals": _ANIMALS, "colors": _COLORS,
                     "numbers": _NUMBERS, "tools": _TOOLS, "cities": _CITIES,
                     "instruments": _INSTRUMENTS, "misc": _MISC},
    "lexicons": {"antonyms": _ANTONYMS, "food_groups": _FOOD_GROUPS},
    "families": [
        _family("last_fruit", "last", vocab="fruits", sep=", ", instructions=[
            "Name the final fruit in the list.",
            "Which fruit is mentioned at the end?",
            "Return the last fruit.",
            "Read the fruits and write the one that comes last.",
            "What is the final item of this fruit list?",
            "Give the fruit at the end of the basket list.",
        ]),
        _family("second_animal", "second", vocab="animals", sep=", ", instructions=[
            "Name the second animal in the list.",
            "Which animal is listed in position two?",
            "Return the animal that comes right after the first one.",
            "Write the second animal you see.",
            "What is the 2nd animal of this zoo list?",
            "Give the animal in second place.",
        ]),
        _family("reverse_color", "reverse", vocab="colors", sep=" ", n_items=(3, 4), instructions=[
            "Write these colors in reverse order.",
            "Reverse the order of the colors.",
            "List the colors backwards, last one first.",
            "Flip the color sequence around.",
            "Say the colors from the end to the start.",
            "Give the colors in the opposite order.",
        ]),
        _family("duplicate_number", "duplicate", vocab="numbers", sep=" ", instructions=[
            "Which number appears twice?",
            "Find the repeated number.",
            "One number occurs two times. Write it.",
            "Report the number that is duplicated.",
            "Spot the number listed more than once.",
            "What number is repeated in the sequence?",
        ]),
        _family("tail_tool", "tail", vocab="tools", sep=", ", instructions=[
            "Remove the first tool and list the rest.",
            "Drop the first tool from the list.",
            "Write every tool except the first one.",
            "List the remaining tools after skipping the first.",
            "Give all tools but the opening one.",
            "Delete the leading tool and keep the others.",
        ]),
        _family("after_city", "after", vocab="cities", sep=", ", instructions=[
            "Which city comes right after the city named after the semicolon?",
            "Find the query city in the route and name the next stop.",
            "Give the city that follows the given city in the list.",
            "After the semicolon is a city. Write the city after it in the route.",
            "Name the next city on the trip after the marked one.",
            "Return the successor of the query city.",
        ]),
        _family("join_instrument", "join", vocab="instruments", sep=" ", joiner=" and ", instructions=[
            "Join the instruments with the word and.",
            "Connect the instruments using and.",
            "Write the instruments linked by and.",
            "Combine the instruments into one phrase with and between them.",
            "Put and between every pair of instruments.",
            "List the instruments joined by and.",
        ]),
        _family("antonym", "lookup", lexicon="antonyms", subset=None, instructions=[
            "Give the antonym of the word.",
            "Write the opposite of this adjective.",
            "What word means the reverse of the input?",
            "Answer with the word of opposite meaning.",
            "Name the antonym.",
            "Which word is the opposite?",
        ]),
        _family("food_group", "lookup", lexicon="food_groups", subset=None, instructions=[
            "Which food group does this belong to?",
            "Name the food category of the item.",
            "Classify the food into its group.",
            "What kind of food is this?",
            "Give the group of this food.",
            "Answer with the food group of the input.",
        ]),
    ],
    "pretrain": {
        "lines": 24000,
        "fact_fraction": 0.2,
        "vocabs": ["fruits", "animals", "colors", "numbers", "tools", "cities", "instruments", "misc"],
        "seps": [", ", " ", " / "],
        "ops": [
            {"op": "copy", "n_items": [2, 5], "instructions": ["Repeat the input.", "Copy the list exactly."]},
            {"op": "first", "n_items": [2, 5], "instructions": ["Give the first item.", "Which item comes first?"]},
            {"op": "count", "n_items": [1, 6], "instructions": ["How many items are there?", "Count the items."]},
            {"op": "contains", "n_items": [2, 5], "instructions": ["Is the query in the list? Answer yes or no."]},
            # Latent skills: the suite's operations, cued only by opaque rule numbers. The base can
            # do them but has never seen a task's instruction, so it fails the tasks; an adapter
            # has to learn to read its instruction as the right rule, and a family's adapters all
            # learn the same routing (what makes mixing them useful). A miniature of a pre-trained
            # LLM whose skills instruction tuning surfaces.
            {"op": "last", "n_items": [3, 6], "instructions": ["Apply rule 11."]},
            {"op": "second", "n_items": [3, 6], "instructions": ["Apply rule 12."]},
            {"op": "reverse", "n_items": [3, 5], "instructions": ["Apply rule 13."]},
            {"op": "duplicate", "n_items": [3, 6], "instructions": ["Apply rule 14."]},
            {"op": "tail", "n_items": [3, 6], "instructions": ["Apply rule 15."]},
            {"op": "after", "n_items": [3, 6], "instructions": ["Apply rule 16."]},
            {"op": "join", "n_items": [3, 6], "joiner": " and ", "instructions": ["Apply rule 17."]},
            {"op": "lookup", "lexicon": "antonyms", "instructions": ["Apply rule 18."]},
            {"op": "lookup", "lexicon": "food_groups", "instructions": ["Apply rule 19."]},
        ],
        "facts": {
            "antonyms": ["the opposite of {k} is {v}.", "{k} and {v} are opposites.",
                         "if it is not {k}, it is {v}."],
            "food_groups": ["{k} is a kind of {v}.", "a {k} belongs to the {v} group.",
                            "we eat {k} as {v}."],
        },
    },
    # The base model, its tokenizer and the training recipes (read by build.py).
    "tokenizer": {"vocab_size": 1024, "min_frequency": 2},
    "model": {"hidden_size": 160, "intermediate_size": 448, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40,
              "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "base_training": {"steps": 2000, "batch_size": 32, "lr": 3e-3, "warmup": 100, "weight_decay": 0.01},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "k_proj", "v_proj"],
             "init_seed": 0,  # one init for every adapter, like a bank trained by one script
             "steps": 200, "batch_size": 16, "lr": 5e-3, "warmup": 20},
    "threads": 1,  # one thread: faster than two on a shared 2-core box, and deterministic
}
