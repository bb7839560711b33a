"""Write the bundled sample data: data/sample/<task>/{train,validation}.jsonl.

Every sentence here was written for this project (no dataset was copied); places, people and
companies are invented. The set exists only so the pipeline runs offline; see README.md.

Deterministic: running it again rewrites the same bytes.

Usage:
    python data/sample/make_sample.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
N_TRAIN = 40  # the rest of each task's examples go to validation

# ---------------------------------------------------------------------- summarization
# Eight short news stories, each told seven times with different facts (i-th value of every
# slot list). Article: 4-5 sentences; highlights: one line each, joined by "\n".

STORIES = [
    dict(
        article="The town of {town} opened a new public library on {day}. The building, which cost {cost} "
                "million euros, replaces a library that had been in use since {year}. Mayor {name} said "
                "the new library would give children more space and offer free internet access. About "
                "{n} people attended the opening ceremony.",
        highlights=["{town} opened a new public library on {day}.", "The building cost {cost} million euros.",
                    "About {n} people attended the opening."],
        town=["Millbrook", "Eastwick", "Harlow Green", "Kelby", "Norwood", "Dunmore", "Westleigh"],
        day=["Monday", "Tuesday", "Friday", "Saturday", "Wednesday", "Thursday", "Sunday"],
        cost=["4", "6.5", "3", "9", "2.8", "5", "7"],
        year=["1952", "1968", "1931", "1977", "1949", "1960", "1983"],
        name=["Ruth Calder", "Owen Pryce", "Ines Vogt", "Samuel Hart", "Nora Blake", "Felix Amari", "Joan Reid"],
        n=["400", "250", "600", "1,200", "300", "850", "500"],
    ),
    dict(
        article="A storm brought heavy rain and strong winds to {region} on {day}. Several roads were "
                "closed after trees fell across them, and {n} homes lost power. Emergency services said "
                "no one was seriously injured. The power company expects to restore electricity to all "
                "homes by {day2}.",
        highlights=["A storm hit {region} on {day}.", "{n} homes lost power; no one was seriously injured."],
        region=["the northern coast", "the Ash valley", "the eastern hills", "the lake district",
                "the southern plains", "the river delta", "the western islands"],
        day=["Sunday", "Thursday", "Monday", "Saturday", "Tuesday", "Friday", "Wednesday"],
        n=["3,000", "12,000", "800", "5,500", "2,100", "9,400", "650"],
        day2=["Tuesday", "the weekend", "Wednesday", "Monday", "Thursday", "Sunday", "Friday"],
    ),
    dict(
        article="{name} won the {town} marathon on {day} in a time of {time}. It was {their} first win "
                "in the race after finishing second last year. More than {n} runners took part, a record "
                "for the event. Organisers said the warm weather made the final kilometres hard for "
                "everyone.",
        highlights=["{name} won the {town} marathon in {time}.", "A record {n} runners took part."],
        name=["Lena Moritz", "David Okafor", "Aiko Tanaka", "Pablo Ruiz", "Grace Whitfield", "Tom Lindqvist",
              "Maria Costa"],
        their=["her", "his", "her", "his", "her", "his", "her"],
        town=["Brenford", "Carrow", "Fenby", "Ashford Vale", "Tallow", "Oakridge", "Pinecrest"],
        day=["Sunday", "Saturday", "Sunday", "Sunday", "Saturday", "Sunday", "Saturday"],
        time=["2 hours 31 minutes", "2 hours 14 minutes", "2 hours 40 minutes", "2 hours 19 minutes",
              "2 hours 36 minutes", "2 hours 22 minutes", "2 hours 44 minutes"],
        n=["4,000", "6,500", "2,200", "8,000", "3,100", "5,000", "1,800"],
    ),
    dict(
        article="Students from {town} High School won first prize at the national science fair on {day}. "
                "Their project showed how {project}. The team of {k} students worked on it for eight "
                "months with their teacher, {name}. They will present their work at an international "
                "fair next year.",
        highlights=["{town} High School students won the national science fair.",
                    "Their project showed how {project}."],
        town=["Kelby", "Dunmore", "Eastwick", "Norwood", "Brenford", "Westleigh", "Fenby"],
        day=["Friday", "Saturday", "Thursday", "Friday", "Wednesday", "Saturday", "Friday"],
        project=["plastic waste can be turned into building bricks",
                 "bees find their way home on cloudy days",
                 "a simple filter can clean rainwater for drinking",
                 "old phone batteries can power street lights",
                 "moss can be used to measure air pollution",
                 "coffee grounds help tomatoes grow",
                 "sound can be used to detect leaks in water pipes"],
        k=["four", "three", "five", "two", "six", "four", "three"],
        name=["Mr Alden", "Ms Ferreira", "Dr Kovac", "Ms Osei", "Mr Brandt", "Ms Lund", "Mr Quinn"],
    ),
    dict(
        article="The {bridge} Bridge in {town} will close for repairs from {day} for {weeks} weeks. "
                "Engineers found cracks in the bridge during a routine inspection last year. Drivers are "
                "advised to use the ring road, which may add about {minutes} minutes to journeys. "
                "Pedestrians and cyclists will be able to cross on a temporary walkway.",
        highlights=["The {bridge} Bridge in {town} closes for {weeks} weeks of repairs.",
                    "Engineers found cracks during an inspection.",
                    "Pedestrians and cyclists can use a temporary walkway."],
        bridge=["Mill", "Queen's", "Station", "Old Stone", "Harbour", "Victoria", "North"],
        town=["Tallow", "Carrow", "Millbrook", "Oakridge", "Harlow Green", "Ashford Vale", "Kelby"],
        day=["1 March", "15 June", "3 September", "10 January", "22 April", "5 October", "12 May"],
        weeks=["six", "ten", "four", "twelve", "eight", "five", "nine"],
        minutes=["15", "20", "10", "25", "15", "10", "20"],
    ),
    dict(
        article="{company}, a maker of {product}, announced on {day} that it will open a new factory in "
                "{town}. The factory is expected to create {n} jobs when it opens in {year}. The company "
                "said it chose {town} because of its good rail links and skilled workers. Local leaders "
                "welcomed the news.",
        highlights=["{company} will open a factory in {town}.", "The factory is expected to create {n} jobs."],
        company=["Norland Tools", "Brightway Foods", "Keller Glass", "Aston Cycles", "Morrow Textiles",
                 "Vantage Solar", "Hollis Furniture"],
        product=["garden tools", "frozen meals", "windows", "bicycles", "outdoor clothing", "solar panels",
                 "office chairs"],
        day=["Tuesday", "Monday", "Thursday", "Wednesday", "Friday", "Tuesday", "Monday"],
        town=["Westleigh", "Fenby", "Norwood", "Dunmore", "Pinecrest", "Eastwick", "Brenford"],
        n=["300", "120", "450", "200", "90", "600", "150"],
        year=["2026", "2025", "2027", "2026", "2025", "2028", "2026"],
    ),
    dict(
        article="A {animal} that had been missing for {days} days was found safe in {town} on {day}. A "
                "neighbour discovered the animal after hearing it {sound} inside a garden shed. Its owner, "
                "{name}, said the family had almost given up hope. A local vet said the {animal} was "
                "hungry but otherwise healthy.",
        highlights=["A {animal} missing for {days} days was found in {town}.",
                    "A neighbour heard it inside a garden shed."],
        animal=["cat", "dog", "tortoise", "rabbit", "parrot", "cat", "puppy"],
        days=["twelve", "five", "thirty", "nine", "three", "twenty", "four"],
        town=["Oakridge", "Tallow", "Westleigh", "Carrow", "Millbrook", "Fenby", "Norwood"],
        day=["Saturday", "Monday", "Wednesday", "Sunday", "Friday", "Tuesday", "Thursday"],
        sound=["meowing", "barking", "scratching", "thumping", "squawking", "meowing", "whining"],
        name=["Clara Holm", "Ben Adair", "Yusuf Demir", "Anna Pike", "Leo Marsh", "Hana Sato", "Eric Vale"],
    ),
    dict(
        article="The annual {food} festival in {town} drew around {n} visitors over the weekend. "
                "Stallholders from {k} countries sold food and drinks, and local bands played on two "
                "stages. Organisers said the event raised {money} euros for the town's youth clubs. Next "
                "year's festival will run for three days instead of two.",
        highlights=["Around {n} visitors attended the {food} festival in {town}.",
                    "The event raised {money} euros for youth clubs."],
        food=["cheese", "apple", "street food", "chocolate", "seafood", "bread", "chilli"],
        town=["Harlow Green", "Pinecrest", "Kelby", "Eastwick", "Dunmore", "Ashford Vale", "Carrow"],
        n=["15,000", "8,000", "22,000", "11,000", "6,500", "9,000", "4,000"],
        k=["twelve", "five", "twenty", "eight", "six", "nine", "four"],
        money=["18,000", "7,500", "30,000", "12,000", "5,000", "9,800", "4,200"],
    ),
]


def summarization() -> list[tuple[dict, str]]:
    examples = []
    for story in STORIES:
        slots = {k: v for k, v in story.items() if k not in ("article", "highlights")}
        for i in range(7):
            values = {k: v[i] for k, v in slots.items()}
            article = story["article"].format(**values)
            target = "\n".join(h.format(**values) for h in story["highlights"])
            examples.append(({"article": article}, target))
    random.Random(1).shuffle(examples)  # mix the stories across train and validation
    return examples


# ------------------------------------------------------------------------ translation

TRANSLATION = [
    ("The train to Berlin leaves at eight o'clock.", "Der Zug nach Berlin fährt um acht Uhr ab."),
    ("My sister works in a small bakery.", "Meine Schwester arbeitet in einer kleinen Bäckerei."),
    ("The museum is closed on Mondays.", "Das Museum ist montags geschlossen."),
    ("We need more time for this project.", "Wir brauchen mehr Zeit für dieses Projekt."),
    ("The children are playing in the garden.", "Die Kinder spielen im Garten."),
    ("The city council approved the new budget yesterday.", "Der Stadtrat hat gestern den neuen Haushalt genehmigt."),
    ("It has been raining since this morning.", "Es regnet seit heute Morgen."),
    ("Please close the window before you leave.", "Bitte schließ das Fenster, bevor du gehst."),
    ("The doctor said that I should rest.", "Der Arzt sagte, dass ich mich ausruhen sollte."),
    ("Electricity prices rose sharply last year.", "Die Strompreise sind im vergangenen Jahr stark gestiegen."),
    ("The bridge will be repaired in the summer.", "Die Brücke wird im Sommer repariert."),
    ("He reads a newspaper every morning.", "Er liest jeden Morgen eine Zeitung."),
    ("The new school has a large library.", "Die neue Schule hat eine große Bibliothek."),
    ("Many people came to the concert in the park.", "Viele Menschen kamen zum Konzert im Park."),
    ("The police are looking for witnesses.", "Die Polizei sucht nach Zeugen."),
    ("I would like a cup of coffee, please.", "Ich hätte gern eine Tasse Kaffee, bitte."),
    ("The company plans to hire fifty new employees.", "Das Unternehmen plant, fünfzig neue Mitarbeiter einzustellen."),
    ("Our neighbours have bought a new car.", "Unsere Nachbarn haben ein neues Auto gekauft."),
    ("The road was closed because of the snow.", "Die Straße war wegen des Schnees gesperrt."),
    ("She has lived in Hamburg for ten years.", "Sie lebt seit zehn Jahren in Hamburg."),
    ("The meeting was moved to Thursday.", "Das Treffen wurde auf Donnerstag verschoben."),
    ("Tourists like to visit the old town.", "Touristen besuchen gern die Altstadt."),
    ("The river flooded several villages.", "Der Fluss hat mehrere Dörfer überschwemmt."),
    ("The shop opens at nine in the morning.", "Das Geschäft öffnet um neun Uhr morgens."),
    ("We are going to the mountains at the weekend.", "Wir fahren am Wochenende in die Berge."),
    ("The minister answered the journalists' questions.", "Der Minister beantwortete die Fragen der Journalisten."),
    ("The team won its third game in a row.", "Die Mannschaft gewann ihr drittes Spiel in Folge."),
    ("The hospital needs more nurses.", "Das Krankenhaus braucht mehr Pflegekräfte."),
    ("My grandfather grew up on a farm.", "Mein Großvater ist auf einem Bauernhof aufgewachsen."),
    ("The festival attracts thousands of visitors every year.", "Das Festival zieht jedes Jahr Tausende von Besuchern an."),
    ("The train was twenty minutes late.", "Der Zug hatte zwanzig Minuten Verspätung."),
    ("Do you know where the station is?", "Weißt du, wo der Bahnhof ist?"),
    ("The students wrote their exams last week.", "Die Studenten haben letzte Woche ihre Prüfungen geschrieben."),
    ("The mayor opened the new swimming pool.", "Der Bürgermeister eröffnete das neue Schwimmbad."),
    ("Water is becoming scarce in the region.", "Wasser wird in der Region knapp."),
    ("The film starts in ten minutes.", "Der Film beginnt in zehn Minuten."),
    ("Most of the guests stayed until midnight.", "Die meisten Gäste blieben bis Mitternacht."),
    ("The factory will close at the end of the year.", "Die Fabrik wird Ende des Jahres schließen."),
    ("I forgot my umbrella at home.", "Ich habe meinen Regenschirm zu Hause vergessen."),
    ("The government wants to build more homes.", "Die Regierung will mehr Wohnungen bauen."),
    ("The cat sleeps on the sofa all day.", "Die Katze schläft den ganzen Tag auf dem Sofa."),
    ("The results will be published next month.", "Die Ergebnisse werden nächsten Monat veröffentlicht."),
    ("The village has only one shop.", "Das Dorf hat nur einen Laden."),
    ("Cycling to work is good for your health.", "Mit dem Fahrrad zur Arbeit zu fahren ist gut für die Gesundheit."),
    ("The fire brigade arrived within a few minutes.", "Die Feuerwehr war innerhalb weniger Minuten vor Ort."),
    ("She speaks three languages fluently.", "Sie spricht fließend drei Sprachen."),
    ("The restaurant serves regional dishes.", "Das Restaurant serviert regionale Gerichte."),
    ("The price of bread has gone up again.", "Der Brotpreis ist wieder gestiegen."),
    ("We met at a friend's wedding.", "Wir haben uns auf der Hochzeit eines Freundes kennengelernt."),
    ("The old castle is being restored.", "Die alte Burg wird restauriert."),
    ("The library lends books for four weeks.", "Die Bibliothek verleiht Bücher für vier Wochen."),
    ("The airport expects more passengers this summer.", "Der Flughafen erwartet in diesem Sommer mehr Passagiere."),
    ("He apologised for the mistake.", "Er entschuldigte sich für den Fehler."),
    ("The farmers are worried about the dry weather.", "Die Landwirte machen sich Sorgen wegen des trockenen Wetters."),
    ("The exhibition shows paintings by young artists.", "Die Ausstellung zeigt Gemälde junger Künstler."),
    ("Tomorrow it will be sunny and warm.", "Morgen wird es sonnig und warm."),
]


def translation() -> list[tuple[dict, str]]:
    return [({"en": en}, de) for en, de in TRANSLATION]


# --------------------------------------------------------------------------------- qa
# Fourteen invented paragraphs, four questions each; answers are spans of the paragraph,
# several with more than one accepted form. The last four paragraphs are validation, so no
# paragraph is in both splits.

QA = [
    ("Harrow Bay is a small fishing town on the northern coast. It was founded in 1742 by sailors from the "
     "south. The town's lighthouse, painted red and white, was built in 1861 and is still in use today. "
     "Every August, Harrow Bay holds a boat festival that attracts about 5,000 visitors.",
     [("When was Harrow Bay founded?", ["1742", "in 1742"]),
      ("What colours is the lighthouse painted?", ["red and white"]),
      ("When was the lighthouse built?", ["1861", "in 1861"]),
      ("How many visitors does the boat festival attract?", ["about 5,000", "5,000"])]),
    ("The Oakridge Public Library opened in 1905 with a gift of 3,000 books from a local teacher named Clara "
     "Dunn. In 1978 the library moved to a larger building on Market Street. Today it holds more than "
     "80,000 books and offers free language classes on Saturday mornings.",
     [("Who gave the first books to the library?", ["Clara Dunn", "a local teacher named Clara Dunn"]),
      ("Where did the library move in 1978?", ["a larger building on Market Street", "Market Street"]),
      ("How many books does the library hold today?", ["more than 80,000", "80,000"]),
      ("When are the free language classes held?", ["on Saturday mornings", "Saturday mornings"])]),
    ("The Velden River starts in the Grey Hills and flows 240 kilometres to the sea. Its largest tributary "
     "is the Moss, which joins it near the town of Ashford. Salmon return to the river every autumn to lay "
     "their eggs. A dam built upstream in 1954 provides electricity for the region.",
     [("Where does the Velden River start?", ["in the Grey Hills", "the Grey Hills"]),
      ("How long is the Velden River?", ["240 kilometres"]),
      ("What is the river's largest tributary?", ["the Moss", "Moss"]),
      ("When do salmon return to the river?", ["every autumn", "autumn"])]),
    ("Marta Ilves was a chemist who studied how plants store water. She was born in a small village in 1931 "
     "and later taught at the university in Tallow for thirty years. Her best-known book, The Thirsty Leaf, "
     "was published in 1969. She won the Green Medal for her research in 1975.",
     [("What did Marta Ilves study?", ["how plants store water"]),
      ("How long did she teach at the university in Tallow?", ["thirty years", "for thirty years"]),
      ("What is her best-known book?", ["The Thirsty Leaf"]),
      ("Which prize did she win in 1975?", ["the Green Medal", "Green Medal"])]),
    ("The Pinecrest Railway is a narrow-gauge line that carries passengers through the forest between "
     "Pinecrest and Lake Orla. The line was first used to transport timber. Steam engines were replaced by "
     "diesel engines in 1962, but a restored steam engine still runs on summer weekends. A one-way trip "
     "takes about ninety minutes.",
     [("Which two places does the railway connect?", ["Pinecrest and Lake Orla"]),
      ("What was the line first used for?", ["to transport timber", "timber"]),
      ("When were the steam engines replaced by diesel engines?", ["1962", "in 1962"]),
      ("How long does a one-way trip take?", ["about ninety minutes", "ninety minutes"])]),
    ("The Northgate Market is held every Wednesday and Saturday in the old town square. About sixty traders "
     "sell vegetables, cheese, bread and flowers. The market was first recorded in a town document from "
     "1523. In winter, the stalls close at two in the afternoon instead of five.",
     [("On which days is the market held?", ["every Wednesday and Saturday", "Wednesday and Saturday"]),
      ("How many traders sell at the market?", ["About sixty", "sixty"]),
      ("When was the market first recorded?", ["1523", "in a town document from 1523"]),
      ("When do the stalls close in winter?", ["at two in the afternoon", "two in the afternoon"])]),
    ("Glenmoor Castle stands on a hill above the village of Glenmoor. It was built of grey stone in the "
     "thirteenth century to guard the valley road. After a fire in 1690 the castle was left empty for almost "
     "two hundred years. It was repaired in the 1880s and is now a museum of local history.",
     [("What is the castle built of?", ["grey stone"]),
      ("Why was the castle built?", ["to guard the valley road"]),
      ("What happened to the castle in 1690?", ["a fire", "fire"]),
      ("What is the castle used for now?", ["a museum of local history", "museum of local history"])]),
    ("The Silver Hawks are an amateur football club from the town of Brenford. The club was formed in 1921 "
     "by workers from the local shoe factory. They play their home games at Field Lane, a ground with space "
     "for 2,500 spectators. In 2019 the Silver Hawks won the regional cup for the first time.",
     [("Where are the Silver Hawks from?", ["the town of Brenford", "Brenford"]),
      ("Who formed the club?", ["workers from the local shoe factory"]),
      ("How many spectators does Field Lane hold?", ["2,500", "2,500 spectators"]),
      ("What did the club win in 2019?", ["the regional cup", "regional cup"])]),
    ("Lake Orla is the deepest lake in the Pinecrest region, reaching 87 metres at its deepest point. It "
     "freezes over in most winters, and people skate on it in January. The lake is home to a rare fish "
     "called the blue char. Swimming is allowed only at the public beach on the eastern shore.",
     [("How deep is Lake Orla at its deepest point?", ["87 metres"]),
      ("When do people skate on the lake?", ["in January", "January"]),
      ("What rare fish lives in the lake?", ["the blue char", "blue char"]),
      ("Where is swimming allowed?", ["only at the public beach on the eastern shore",
                                      "the public beach on the eastern shore"])]),
    ("The Brightwater Bakery was opened by two brothers, Tomas and Leo Reyes, in 1998. It is known for its "
     "rye bread, which is baked in a wood-fired oven. The bakery uses flour from a mill twelve kilometres "
     "away. On Sundays it is closed so that the staff can rest.",
     [("Who opened the bakery?", ["Tomas and Leo Reyes", "two brothers, Tomas and Leo Reyes"]),
      ("What is the bakery known for?", ["its rye bread", "rye bread"]),
      ("How far away is the mill?", ["twelve kilometres", "twelve kilometres away"]),
      ("On which day is the bakery closed?", ["Sundays", "On Sundays"])]),
    ("The Kessel Observatory sits on Mount Arden at a height of 1,900 metres. It was opened in 1936 and its "
     "main telescope has a mirror 1.2 metres wide. Astronomers chose the site because the air there is dry "
     "and the sky is dark. The observatory offers public viewing nights twice a month.",
     [("Where is the Kessel Observatory?", ["on Mount Arden", "Mount Arden"]),
      ("How wide is the main telescope's mirror?", ["1.2 metres"]),
      ("Why did astronomers choose the site?", ["because the air there is dry and the sky is dark",
                                                "the air there is dry and the sky is dark"]),
      ("How often are public viewing nights held?", ["twice a month"])]),
    ("Redfern Park covers 40 hectares on the west side of the city. It was a royal hunting ground until "
     "1845, when it was opened to the public. The park has a rose garden with more than 300 kinds of roses. "
     "A small train runs around the lake for children during the summer.",
     [("How large is Redfern Park?", ["40 hectares"]),
      ("What was the park before 1845?", ["a royal hunting ground", "royal hunting ground"]),
      ("How many kinds of roses does the rose garden have?", ["more than 300", "300"]),
      ("What runs around the lake in summer?", ["A small train", "small train"])]),
    ("The Stonebridge Choir was founded in 1952 by a music teacher, Ada Marsh. It has about forty members, "
     "who meet every Tuesday evening in the church hall. The choir sings mostly folk songs from the region. "
     "Each December it gives a concert to raise money for the local hospital.",
     [("Who founded the Stonebridge Choir?", ["Ada Marsh", "a music teacher, Ada Marsh"]),
      ("Where does the choir meet?", ["in the church hall", "the church hall"]),
      ("What does the choir mostly sing?", ["folk songs from the region", "folk songs"]),
      ("What does the December concert raise money for?", ["the local hospital", "local hospital"])]),
    ("The Ferrow Tunnel links the towns of Ferrow and Dale under the Ash Mountains. Work on the tunnel began "
     "in 1989 and took seven years. The tunnel is 6.4 kilometres long and carries both cars and trains. "
     "Before it opened, the journey over the mountain pass took more than two hours.",
     [("Which towns does the Ferrow Tunnel link?", ["Ferrow and Dale"]),
      ("How long did work on the tunnel take?", ["seven years"]),
      ("How long is the tunnel?", ["6.4 kilometres"]),
      ("How long did the journey over the pass take before the tunnel opened?", ["more than two hours"])]),
]


def qa() -> list[tuple[dict, list[str]]]:
    examples = []
    for k, (context, questions) in enumerate(QA):
        for question, answers in questions:
            assert all(a in context for a in answers), (question, answers)  # spans, as in SQuAD
            examples.append(({"title": f"Sample_{k + 1:02d}", "context": context, "question": question}, answers))
    return examples


# -------------------------------------------------------------------------- sentiment
# 28 positive and 28 negative review snippets; 20 + 20 train, 8 + 8 validation.

POSITIVE = [
    "a warm, funny film that never talks down to its audience",
    "the performances are terrific from start to finish",
    "one of the most charming comedies of the year",
    "the director keeps the story moving with real confidence",
    "a moving portrait of a family that feels completely honest",
    "the soundtrack alone is worth the price of a ticket",
    "beautifully shot and surprisingly tender",
    "i laughed harder than i have in months",
    "a smart thriller with a twist that actually works",
    "the lead actor gives a wonderfully understated performance",
    "clever , fast and full of heart",
    "the animation is gorgeous and the jokes land",
    "a rare sequel that improves on the original",
    "it 's a pleasure to watch these two actors together",
    "the script is sharp and the dialogue sparkles",
    "an inspiring story told with great care",
    "the final scene left the whole theatre cheering",
    "a delightful surprise from a first-time director",
    "the cast is excellent across the board",
    "rich , thoughtful and often very funny",
    "a gripping documentary that stays with you",
    "the film finds beauty in ordinary lives",
    "an energetic and thoroughly enjoyable adventure",
    "every frame shows how much the crew cared",
    "a confident , witty debut",
    "the kind of movie you want to see twice",
    "touching without ever becoming sentimental",
    "the best family film i have seen in years",
]

NEGATIVE = [
    "a dull , overlong mess with no sense of direction",
    "the jokes fall flat one after another",
    "the plot makes no sense even by the film 's own rules",
    "wooden acting and a lifeless script",
    "i checked my watch more than once",
    "a lazy sequel that simply repeats the first film",
    "the characters are too thin to care about",
    "the ending is rushed and unsatisfying",
    "painfully slow and oddly cold",
    "a waste of a talented cast",
    "the dialogue sounds like it was written in an afternoon",
    "loud , confusing and strangely boring",
    "the special effects cannot hide the empty story",
    "a thriller without a single thrill",
    "the film never decides what it wants to be",
    "tedious from the opening scene",
    "the humour is cruel rather than clever",
    "an embarrassing misfire for everyone involved",
    "the pacing drags badly in the second half",
    "a forgettable comedy that forgets to be funny",
    "the story is predictable and the twist is obvious",
    "clumsy editing ruins the few good moments",
    "the lead performance is flat and unconvincing",
    "too long , too loud and far too pleased with itself",
    "the music is the only good thing in it",
    "a muddled script sinks the whole film",
    "i left the cinema feeling cheated",
    "a tired remake with nothing new to say",
]


def sentiment() -> tuple[list, list]:
    def examples(pos, neg):
        return [({"sentence": s}, "positive") for s in pos] + [({"sentence": s}, "negative") for s in neg]
    return examples(POSITIVE[:20], NEGATIVE[:20]), examples(POSITIVE[20:], NEGATIVE[20:])


# -------------------------------------------------------------------------------- nli
# 18 premises, each with one entailed, one neutral and one contradicting hypothesis;
# 13 premises (39 pairs) train, 5 (15 pairs) validation, so no premise is in both.

NLI = [
    ("A woman is riding a bicycle along the river on a sunny morning.",
     "A woman is outside.", "The woman is riding to work.", "The woman is sitting in her kitchen."),
    ("Two children are building a sandcastle on the beach.",
     "Kids are playing in the sand.", "The children are brother and sister.", "The children are asleep in bed."),
    ("The restaurant was full, so we waited forty minutes for a table.",
     "We had to wait for a table.", "The food at the restaurant was excellent.", "We were seated immediately."),
    ("A man in a red jacket is playing the guitar in a subway station.",
     "A man is playing an instrument.", "The man is hoping to earn some money.",
     "The man is playing the drums on a stage."),
    ("The city council voted to close the old library next spring.",
     "The council made a decision about the library.", "Many residents are upset about the vote.",
     "The council voted to keep the library open."),
    ("An elderly couple is walking their dog in the park.",
     "Two people are with a dog.", "The dog is a golden retriever.", "The couple is swimming in a pool."),
    ("The train was delayed for an hour because of snow on the tracks.",
     "Snow caused a delay.", "Passengers complained to the railway company.", "The train arrived early."),
    ("A chef is chopping onions in a busy kitchen.",
     "Someone is preparing food.", "The chef is making soup.", "The kitchen is empty."),
    ("She passed her driving test on the first attempt.",
     "She passed the test.", "She bought a car the following week.", "She failed her driving test."),
    ("A group of students is studying together in the library.",
     "Students are in the library.", "The students have an exam tomorrow.", "The students are playing football."),
    ("The firefighters put out the fire before it reached the houses.",
     "The fire was put out.", "The fire started in a field.", "The fire destroyed the houses."),
    ("A little girl is feeding ducks at a pond.",
     "A child is near water.", "The girl is with her grandmother.", "The girl is feeding horses in a stable."),
    ("The company hired twenty new engineers this year.",
     "The company took on new staff.", "The engineers work on software.",
     "The company laid off all of its engineers."),
    ("A man is repairing the roof of his house while it rains.",
     "It is raining.", "The roof has been leaking for weeks.", "The man is sunbathing on the roof."),
    ("The orchestra played to a packed concert hall.",
     "Many people attended the concert.", "The orchestra played music by Beethoven.", "The concert hall was empty."),
    ("Two men are carrying a sofa up a narrow staircase.",
     "Two people are moving furniture.", "The men are moving into a new flat.",
     "The men are carrying a piano down the street."),
    ("The bakery sold out of bread by nine in the morning.",
     "No bread was left by nine.", "The bakery opened at six.", "The bakery had plenty of bread all day."),
    ("A teenager is skateboarding in an empty car park.",
     "Someone is skateboarding.", "The teenager is practising for a competition.", "The car park is full of cars."),
]
N_NLI_TRAIN = 13


def nli() -> tuple[list, list]:
    def examples(rows):
        return [({"premise": p, "hypothesis": h}, label) for p, *hyps in rows
                for h, label in zip(hyps, ("entailment", "neutral", "contradiction"))]
    return examples(NLI[:N_NLI_TRAIN]), examples(NLI[N_NLI_TRAIN:])


# ----------------------------------------------------------------------- paraphrasing

PARAPHRASING = [
    ("The meeting was postponed because the manager was ill.", "Because the manager was sick, the meeting was put off."),
    ("She finished the report before the deadline.", "She completed the report ahead of the deadline."),
    ("The company reported higher profits this quarter.", "This quarter the firm posted increased earnings."),
    ("Heavy rain forced the organisers to cancel the match.", "The organisers called off the match because of heavy rain."),
    ("He rarely eats breakfast on weekdays.", "On weekdays he seldom has breakfast."),
    ("The new law takes effect on the first of January.", "The new legislation comes into force on January 1."),
    ("Most residents oppose the plan to build a car park.", "The majority of residents are against the proposed car park."),
    ("The museum attracted a record number of visitors last year.", "Last year the museum drew more visitors than ever before."),
    ("The bus was crowded, so we decided to walk.", "We chose to walk because the bus was full."),
    ("The teacher explained the problem again.", "The problem was explained once more by the teacher."),
    ("Police arrested two men after the robbery.", "Two men were taken into custody following the robbery."),
    ("The shop will close early on Friday.", "On Friday the store is closing earlier than usual."),
    ("Scientists found traces of water on the planet.", "Traces of water were discovered on the planet by scientists."),
    ("The film received mixed reviews from critics.", "Critics gave the film a mixed reception."),
    ("He has worked at the factory for twenty years.", "He has been employed at the plant for two decades."),
    ("The price of petrol fell for the third week in a row.", "Petrol prices dropped for a third consecutive week."),
    ("The children were too excited to sleep.", "The kids were so excited that they could not fall asleep."),
    ("The council plans to plant a thousand trees.", "A thousand trees are to be planted under the council's plan."),
    ("The singer cancelled her tour due to illness.", "Illness forced the singer to call off her tour."),
    ("The road will remain closed until Monday.", "The road stays shut until Monday."),
    ("The hotel is only a short walk from the beach.", "The beach is just a few minutes on foot from the hotel."),
    ("Sales of electric cars doubled last year.", "Last year electric car sales rose twofold."),
    ("The report criticised the hospital's management.", "The hospital's management was criticised in the report."),
    ("She learned to play the piano as a child.", "She took up the piano when she was young."),
    ("The team hopes to reach the final.", "The team is aiming to make it to the final."),
    ("The bridge was built more than a century ago.", "The bridge is over a hundred years old."),
    ("Visitors must show a ticket at the entrance.", "A ticket has to be presented at the entrance by visitors."),
    ("The storm knocked out power to thousands of homes.", "Thousands of households lost electricity in the storm."),
    ("He apologised for arriving late.", "He said sorry for being late."),
    ("The recipe calls for two eggs and a cup of flour.", "You need two eggs and a cup of flour for the recipe."),
    ("The airline added new flights to Lisbon.", "New routes to Lisbon were added by the airline."),
    ("The students protested against higher fees.", "Students demonstrated against the increase in fees."),
    ("The old mill has been turned into apartments.", "The former mill was converted into flats."),
    ("The suspect denied all the charges.", "All of the charges were rejected by the suspect."),
    ("Unemployment fell to its lowest level in a decade.", "Joblessness dropped to a ten-year low."),
    ("The village celebrates its harvest festival in October.", "Every October the village holds a harvest festival."),
    ("The library extended its opening hours.", "The library is now open for longer."),
    ("The minister refused to comment on the rumours.", "The minister declined to respond to the rumours."),
    ("Our flight was delayed by two hours.", "Our plane left two hours late."),
    ("The company will announce its results on Tuesday.", "The firm is due to report its results on Tuesday."),
    ("She donated the money to a local charity.", "She gave the money to a charity in the area."),
    ("The concert sold out within an hour.", "All the concert tickets were gone in less than an hour."),
    ("The mayor promised to fix the roads.", "The mayor pledged to repair the streets."),
    ("Fewer people are buying newspapers.", "Newspaper sales are falling."),
    ("The coach praised his players after the match.", "After the game the coach had words of praise for his players."),
    ("The factory produces five hundred bicycles a day.", "Five hundred bicycles a day come out of the factory."),
    ("The hikers were rescued after a night on the mountain.", "After spending a night on the mountain, the hikers were saved."),
    ("He decided to sell his house and move abroad.", "He chose to sell his home and relocate overseas."),
    ("The exhibition will run until the end of May.", "The exhibition remains open through the end of May."),
    ("Rising rents are pushing families out of the city.", "Families are being forced out of the city by higher rents."),
    ("The experiment failed because the sample was contaminated.", "A contaminated sample caused the experiment to fail."),
    ("The town hall was evacuated after a fire alarm.", "A fire alarm led to the evacuation of the town hall."),
    ("The baker starts work at four in the morning.", "The baker begins his day at 4 a.m."),
    ("The union called for a strike next week.", "The union has called a strike for next week."),
    ("The garden is full of roses in June.", "In June roses fill the garden."),
    ("The writer's new novel is set in Scotland.", "Scotland is the setting of the author's latest novel."),
]


def paraphrasing() -> list[tuple[dict, str]]:
    return [({"sentence1": s1}, s2) for s1, s2 in PARAPHRASING]


# ------------------------------------------------------------------------ commonsense
# (goal, correct solution, wrong solution). The correct one is sol1 for even positions and
# sol2 for odd ones, so "1" and "2" are balanced in both splits.

COMMONSENSE = [
    ("Keep bread fresh for longer.", "Store it in a sealed bag in a cool, dry place.",
     "Store it in an open bowl next to the oven."),
    ("Remove a stuck jar lid.", "Run the lid under hot water, then twist it with a dry towel.",
     "Run the lid under cold oil, then twist it with wet hands."),
    ("Dry wet shoes overnight.", "Stuff them with newspaper and leave them in a warm room.",
     "Fill them with water and leave them in the freezer."),
    ("Clean a dirty kitchen sponge.", "Soak it in hot soapy water and squeeze it out.",
     "Cover it in flour and leave it in the sun."),
    ("Make ice cubes.", "Pour water into an ice tray and put it in the freezer.",
     "Pour water into an ice tray and put it in the oven."),
    ("Stop a small cut from bleeding.", "Press a clean cloth firmly on the cut.",
     "Rub salt into the cut and leave it open."),
    ("Find a small screw dropped on the carpet.", "Cover a vacuum nozzle with a thin sock and vacuum slowly.",
     "Pour water on the carpet and wait for the screw to float."),
    ("Keep a door from slamming in the wind.", "Put a rubber wedge under the door.",
     "Take the handle off the door."),
    ("Soften hard brown sugar.", "Put it in a closed container with a slice of bread overnight.",
     "Put it in the freezer overnight."),
    ("Light a candle without burning your fingers.", "Use a long match or a lighter with a long neck.",
     "Hold the wick between your fingers while lighting it."),
    ("Clean a window without streaks.", "Spray it with diluted vinegar and wipe it with newspaper.",
     "Spread butter on it and wipe it with a towel."),
    ("Keep a cut apple from turning brown.", "Squeeze a little lemon juice over the slices.",
     "Leave the slices out in the sun."),
    ("Untangle a knotted necklace.", "Put a drop of oil on the knot and loosen it with two pins.",
     "Pull both ends of the chain as hard as you can."),
    ("Carry a full cup of coffee without spilling it.", "Walk slowly and watch the cup, not your feet.",
     "Run quickly while looking at your phone."),
    ("Stop a wooden drawer from sticking.", "Rub a candle along the runners.",
     "Pour water along the runners."),
    ("Peel a hard-boiled egg easily.", "Cool it in cold water, then crack it and peel it under the tap.",
     "Heat it in the microwave, then peel it straight away."),
    ("Remove a splinter from your finger.", "Clean the area and pull it out with sterilised tweezers.",
     "Push it further in with a pencil."),
    ("Keep flowers in a vase fresh for longer.", "Trim the stems and change the water every two days.",
     "Keep the vase in a hot car."),
    ("Spot your suitcase quickly at the airport.", "Tie a bright ribbon around the handle.",
     "Paint it the same black as most other cases."),
    ("Stop glasses fogging up in the cold.", "Wipe the lenses with a drop of washing-up liquid and polish them dry.",
     "Breathe on the lenses just before going outside."),
    ("Cool down a hot room at night.", "Open windows on opposite sides to let a breeze through.",
     "Close all the windows and turn on the oven."),
    ("Keep a picnic sandwich from going soggy.", "Pack the wet fillings separately and assemble it just before eating.",
     "Soak the bread in tomato juice the night before."),
    ("Get rid of a bad smell in the fridge.", "Put an open box of baking soda on a shelf.",
     "Leave the fridge door open all week."),
    ("Measure half a cup of flour without a measuring cup.", "Use a standard mug filled about halfway.",
     "Use a bucket filled to the top."),
    ("Stop a nail from splitting a thin board.", "Drill a small pilot hole before hammering the nail in.",
     "Hit the nail as hard as possible on the first try."),
    ("Water plants while away for a few days.", "Fill a bottle with water and push it upside down into the soil.",
     "Put the plants in a dark cupboard."),
    ("Make a paper airplane fly farther.", "Fold it neatly with sharp creases and throw it gently.",
     "Crumple it into a ball and throw it downward."),
    ("Remove chewing gum from clothes.", "Freeze the clothing and scrape off the hardened gum.",
     "Iron the gum flat into the fabric."),
    ("Keep a tablecloth from blowing away outdoors.", "Clip it to the table edges with binder clips.",
     "Spray it with water so it dries faster."),
    ("Check whether an egg is still fresh.", "Place it in a bowl of water; a fresh egg sinks.",
     "Paint the shell and see whether the colour changes."),
    ("Stop a rug from sliding on a wooden floor.", "Put a rubber mat underneath it.",
     "Polish the floor under it with wax."),
    ("Open a bottle without a bottle opener.", "Lever the cap off with the edge of a sturdy spoon.",
     "Tap the cap gently with a feather."),
    ("Save a phone that fell into water.", "Turn it off, dry it, and leave it in a bag of dry rice.",
     "Turn it on and charge it immediately."),
    ("Protect a car windscreen from frost overnight.", "Cover it with a piece of cardboard or an old blanket.",
     "Pour water over it before going to bed."),
    ("Keep ants out of the sugar.", "Store the sugar in a jar with a tight lid.",
     "Leave the sugar in an open bag on the floor."),
    ("Get a cake out of its tin cleanly.", "Grease the tin and line it with baking paper before baking.",
     "Pour the batter into a cold, wet tin."),
    ("Keep your hands warm while cycling in winter.", "Wear lined gloves and pull your sleeves over your wrists.",
     "Hold a cold metal bar while riding."),
    ("Clean a burnt pan.", "Soak it with baking soda and hot water, then scrub it.",
     "Put it back on the stove on high heat."),
    ("Hang a picture straight.", "Put a spirit level on top of the frame.",
     "Hang it in the dark and guess."),
    ("Sharpen a pencil without a sharpener.", "Carefully shave the wood with a small knife.",
     "Rub the tip against a pillow."),
    ("Stop a hinge from squeaking.", "Apply a little oil to the hinge pin.",
     "Hit the hinge with a hammer."),
    ("Make cooked rice less sticky.", "Rinse the rice in cold water before cooking it.",
     "Stir sugar into the rice while it cooks."),
    ("Find the end of a roll of tape.", "Run a fingernail around the roll until you feel the edge.",
     "Drop the roll into boiling water."),
    ("Keep your place in a book.", "Put a bookmark between the pages.",
     "Close the book and shake it."),
    ("Chill a can of drink quickly.", "Wrap it in a wet paper towel and put it in the freezer for fifteen minutes.",
     "Put it on a sunny windowsill."),
    ("Stop cheese from drying out in the fridge.", "Wrap it in wax paper and then in a loose plastic bag.",
     "Leave it unwrapped on an open plate."),
    ("Remove salt stains from leather boots.", "Wipe them with a cloth dipped in water and a little vinegar.",
     "Scrub them with sand."),
    ("Keep a used tea bag from staining the counter.", "Put it on a small saucer.",
     "Put it straight on the counter."),
    ("Make a rough wooden handle comfortable to hold.", "Sand the handle smooth and rub oil into it.",
     "Wrap it in wet paper."),
    ("Keep pasta water from boiling over.", "Lay a wooden spoon across the top of the pot.",
     "Put the lid on tightly and turn the heat to maximum."),
    ("Make it easier to wake up early.", "Go to bed at the same time every night.",
     "Drink strong coffee right before bed."),
    ("Keep the cables behind a desk tidy.", "Bundle them together with reusable ties.",
     "Tie them in as many knots as possible."),
    ("Dry herbs from the garden.", "Hang small bunches upside down in a dry, airy room.",
     "Keep them in a closed plastic box in the sink."),
    ("Stop a tent from flooding in the rain.", "Pitch it on higher ground and tighten the rain cover.",
     "Pitch it at the bottom of a ditch."),
    ("Loosen a tight knot in a shoelace.", "Push a fork tine into the knot and wiggle it loose.",
     "Pull the laces harder in the same direction."),
    ("Reuse a glass jar for storing rice.", "Wash it with hot soapy water and let it dry completely.",
     "Fill it with rice straight away while it is still wet."),
]


def commonsense() -> list[tuple[dict, str]]:
    examples = []
    for i, (goal, right, wrong) in enumerate(COMMONSENSE):
        sol1, sol2, target = (right, wrong, "1") if i % 2 == 0 else (wrong, right, "2")
        examples.append(({"goal": goal, "sol1": sol1, "sol2": sol2}, target))
    return examples


# ---------------------------------------------------------------------------- writing

def _record(task: str, i: int, inp: dict, target) -> dict:
    record = {"id": f"sample-{task}-{i:03d}", "task": task, "input": inp}
    if task == "qa":  # qa keeps every accepted answer beside its first one, as ../shared/data does
        return {**record, "target": target[0], "answers": target}
    return {**record, "target": target}


def _write(task: str, split: str, records: list[dict]) -> None:
    path = OUT / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    splits = {
        "summarization": summarization(), "translation": translation(), "qa": qa(), "sentiment": sentiment(),
        "nli": nli(), "paraphrasing": paraphrasing(), "commonsense": commonsense(),
    }
    for task, made in splits.items():
        train, validation = made if isinstance(made, tuple) else (made[:N_TRAIN], made[N_TRAIN:])
        numbered = list(enumerate(train + validation))
        rng = random.Random(0)
        # Shuffle within each split so labels interleave; ids keep the order they were written in.
        for split, part in (("train", numbered[:len(train)]), ("validation", numbered[len(train):])):
            part = part[:]
            rng.shuffle(part)
            _write(task, split, [_record(task, i, inp, target) for i, (inp, target) in part])


if __name__ == "__main__":
    main()
