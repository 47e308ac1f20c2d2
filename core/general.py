"""Built-in general questions outside any team's domain, with the answers a sound model gives.

A job with chat validation data asks the first `general_samples` of them, with no system prompt, of the base and of
the tuned model after its held-out sample (worker/training/answers.py): whether the adapter kept the base's general
answering, which held-out data of the domain cannot show. Their key facts (core/quality.py) are the numbers and the
quoted words. The order mixes the kinds, so that any first few cover arithmetic, counting, places, science and words.
The list only grows at its end: the first N stay the same questions from release to release, so jobs compare.
"""

# Generation's bounds, shared by the worker (worker/training/answers.py, replay.py) and the plan's duration: prompts
# are answered GENERATION_BATCH at a time, and a replayed answer is at most REPLAY_MAX_NEW_TOKENS long.
GENERATION_BATCH = 8
REPLAY_MAX_NEW_TOKENS = 128

GENERAL_QUESTIONS: list[tuple[str, str]] = [
    ("What is the capital of France?", 'The capital of France is "Paris".'),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is 8 plus 5?", "8 plus 5 is 13."),
    ("What is the opposite of hot?", 'The opposite of hot is "cold".'),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("What is the largest planet in our solar system?", 'The largest planet is "Jupiter".'),
    ("Who wrote Romeo and Juliet?", 'Romeo and Juliet was written by "Shakespeare".'),
    ("At what temperature in Celsius does water boil at sea level?", "Water boils at 100 degrees Celsius."),
    ("What is the capital of Japan?", 'The capital of Japan is "Tokyo".'),
    ("How many months are in a year?", "A year has 12 months."),
    ("What is 5 times 6?", "5 times 6 is 30."),
    ("What do bees make?", 'Bees make "honey".'),
    ("How many wheels does a bicycle have?", "A bicycle has 2 wheels."),
    ("Which planet do we live on?", 'We live on "Earth".'),
    ("What language is mainly spoken in Spain?", 'The main language of Spain is "Spanish".'),
    ("How many letters are in the English alphabet?", "The English alphabet has 26 letters."),
    ("How many seconds are in a minute?", "A minute has 60 seconds."),
    ("What is 100 minus 30?", "100 minus 30 is 70."),
    ("What is frozen water called?", 'Frozen water is called "ice".'),
    ("How many continents are there?", "There are 7 continents."),
    ("What color is the sky on a clear day?", 'The sky is "blue" on a clear day.'),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is half of 50?", "Half of 50 is 25."),
    ("What colour do you get by mixing blue and yellow?", 'Mixing blue and yellow gives "green".'),
]

# Prompts outside any domain whose answers by the base itself are mixed into a job's training data (`general_replay`,
# worker/training/replay.py): training on what the base already says keeps it saying it. None of them is one of the
# general questions above nor of the quality benchmark's (examples/make_quality_datasets.py), which measure what
# survived and must stay unseen; the same kinds (numbers, places,
# science, words) and some short tasks, so the base's manner of answering is replayed too, not only its facts.
# Only the answers of the base are trained, never an answer written here: nothing is taught that the base did not say.
REPLAY_PROMPTS: list[str] = [
    "What is the largest desert in the world?",
    "What is the capital of Italy?",
    "What is 7 times 8?",
    "Give a synonym for happy.",
    "Why do leaves change colour in autumn?",
    "What is a verb?",
    "What is the chemical symbol for gold?",
    "Write one sentence about the sea.",
    "What is 45 divided by 9?",
    "Who painted the Mona Lisa?",
    "How many players are on a football team on the pitch?",
    "What does a bee use its stinger for?",
    "Name three primary colours.",
    "What is the capital of Canada?",
    "Explain what a noun is.",
    "How many weeks are in a year?",
    "What is 23 plus 19?",
    "What gas do plants take in from the air?",
    "Translate 'thank you' into French.",
    "What is the tallest mountain on Earth?",
    "How many strings does a standard guitar have?",
    "What is the square root of 81?",
    "What does a thermometer measure?",
    "Give me a tip for sleeping better.",
    "What is the currency of the United Kingdom?",
    "How many zeros are in one million?",
    "What is the main ingredient of guacamole?",
    "What is 15 percent of 200?",
    "Which ocean is the largest?",
    "What is the past tense of run?",
    "How many bones are in the adult human body?",
    "Summarise the story of Cinderella in two sentences.",
    "What is the capital of Australia?",
    "How many planets are in our solar system?",
    "What is 9 squared?",
    "What is a volcano?",
    "Write a short haiku about rain.",
    "Which animal is known as the king of the jungle?",
    "What is the first letter of the Greek alphabet?",
    "What is the plural of mouse?",
    "What instrument has 88 keys?",
    "What is 1000 minus 250?",
    "Who was the first person to walk on the Moon?",
    "What shape has four equal sides and four right angles?",
    "Explain in one sentence why the sky gets dark at night.",
    "Which bird is a symbol of peace?",
    "How many degrees are in a right angle?",
    "What is the largest mammal?",
    "What is 3 to the power of 4?",
    "Give an example of a fruit that is red.",
    "What organ pumps blood through the body?",
    "How many sides does a hexagon have?",
    "What is the capital of Germany?",
    "Suggest a name for a pet goldfish.",
    "What is the speed of light, roughly, in kilometres per second?",
    "How many centimetres are in a metre?",
    "What is the opposite of ancient?",
    "Which continent is Egypt in?",
    "What is 64 divided by 8?",
    "Describe a cat in one sentence.",
    "What do caterpillars turn into?",
    "How many grams are in a kilogram?",
    "What is the longest river in Africa?",
    "List the days of the weekend.",
]
