"""Built-in general questions outside any team's domain, with the answers a sound model gives.

A job with chat validation data asks the first `general_samples` of them, with no system prompt, of the base and of
the tuned model after its held-out sample (worker/training/answers.py): whether the adapter kept the base's general
answering, which held-out data of the domain cannot show. Their key facts (core/quality.py) are the numbers and the
quoted words. The order mixes the kinds, so that any first few cover arithmetic, counting, places, science and words.
The list only grows at its end: the first N stay the same questions from release to release, so jobs compare.
"""

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
