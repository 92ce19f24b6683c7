"""Countries and territories from the `countryinfo` wheel (the "geography" retain domain).

Records: one per ISO 3166 alpha-3 code among `countryinfo/data/*.json` (entries whose "name" is not a string
are skipped; of two files with the same code the one with more fields is kept), id ``"country:FRA"``.
countryinfo gives languages and currencies as ISO codes; the English names come from the small tables below
(codes without a name, such as fund codes, are ignored).

Text (one short factual paragraph per country, generated from the fields): ``"France is a country in Western
Europe, part of Europe. Its capital is Paris. The main language is French and the currency is the euro.
People from France are called French. It has a population of about 66 million. It borders Andorra, ..."``.

Questions (cloze stems; none of a country's other true values is ever a distractor):

* ``country_capital``: ``"The capital city of France is"`` -> ``"Paris"``
* ``country_region``: ``"France is a country in the world region of"`` -> ``"Europe"`` (closed set of five;
  "Americas" is written "the Americas")
* ``country_subregion``: ``"The United Nations geoscheme places France in the subregion"`` -> ``"Western
  Europe"`` (closed set)
* ``country_currency``: ``"The official currency of France is the"`` -> ``"euro"`` (closed set)
* ``country_language``: ``"The official language of France is"`` -> ``"French"`` (closed set)
* ``country_demonym``: ``"The demonym for people from France is"`` -> ``"French"``
* ``country_border``: ``"France shares a land border with"`` -> a neighbour. Borders are symmetric, so the
  answer is drawn (seeded by the record id) only among neighbours in the *same split*: a held-out answer
  never sits in a fit text ("Spain ... borders France") of another split. Distractors are non-neighbours.
"""

from __future__ import annotations

import glob
import json
import os

from dsg.data.common import Probe, Record, clean, join_list, seeded_rng, split_of

PACKAGE = "countryinfo"
PIP_SPEC = "countryinfo==1.0.1"
DATA_DIR = "data"
DESCRIPTION = "Countries and territories: capitals, regions, currencies, languages (countryinfo 1.0.1)"
CLOSED_TEMPLATES = ("country_region", "country_subregion", "country_currency", "country_language", "country_border")

CURRENCIES = {
    "AED": "United Arab Emirates dirham",
    "AFN": "Afghan afghani",
    "ALL": "Albanian lek",
    "AMD": "Armenian dram",
    "AOA": "Angolan kwanza",
    "ARS": "Argentine peso",
    "AUD": "Australian dollar",
    "AWG": "Aruban florin",
    "AZN": "Azerbaijani manat",
    "BAM": "Bosnia and Herzegovina convertible mark",
    "BBD": "Barbadian dollar",
    "BDT": "Bangladeshi taka",
    "BGN": "Bulgarian lev",
    "BHD": "Bahraini dinar",
    "BIF": "Burundian franc",
    "BMD": "Bermudian dollar",
    "BND": "Brunei dollar",
    "BOB": "Bolivian boliviano",
    "BRL": "Brazilian real",
    "BSD": "Bahamian dollar",
    "BTN": "Bhutanese ngultrum",
    "BWP": "Botswana pula",
    "BYR": "Belarusian ruble",
    "BZD": "Belize dollar",
    "CAD": "Canadian dollar",
    "CDF": "Congolese franc",
    "CHF": "Swiss franc",
    "CLP": "Chilean peso",
    "CNY": "Chinese yuan",
    "COP": "Colombian peso",
    "CRC": "Costa Rican colon",
    "CUC": "Cuban convertible peso",
    "CUP": "Cuban peso",
    "CVE": "Cape Verdean escudo",
    "CZK": "Czech koruna",
    "DJF": "Djiboutian franc",
    "DKK": "Danish krone",
    "DOP": "Dominican peso",
    "DZD": "Algerian dinar",
    "EGP": "Egyptian pound",
    "ERN": "Eritrean nakfa",
    "ETB": "Ethiopian birr",
    "EUR": "euro",
    "FJD": "Fijian dollar",
    "FKP": "Falkland Islands pound",
    "GBP": "pound sterling",
    "GEL": "Georgian lari",
    "GHS": "Ghanaian cedi",
    "GIP": "Gibraltar pound",
    "GMD": "Gambian dalasi",
    "GNF": "Guinean franc",
    "GTQ": "Guatemalan quetzal",
    "GYD": "Guyanese dollar",
    "HKD": "Hong Kong dollar",
    "HNL": "Honduran lempira",
    "HRK": "Croatian kuna",
    "HTG": "Haitian gourde",
    "HUF": "Hungarian forint",
    "IDR": "Indonesian rupiah",
    "ILS": "Israeli new shekel",
    "INR": "Indian rupee",
    "IQD": "Iraqi dinar",
    "IRR": "Iranian rial",
    "ISK": "Icelandic krona",
    "JMD": "Jamaican dollar",
    "JOD": "Jordanian dinar",
    "JPY": "Japanese yen",
    "KES": "Kenyan shilling",
    "KGS": "Kyrgyzstani som",
    "KHR": "Cambodian riel",
    "KMF": "Comorian franc",
    "KPW": "North Korean won",
    "KRW": "South Korean won",
    "KWD": "Kuwaiti dinar",
    "KYD": "Cayman Islands dollar",
    "KZT": "Kazakhstani tenge",
    "LAK": "Lao kip",
    "LBP": "Lebanese pound",
    "LKR": "Sri Lankan rupee",
    "LRD": "Liberian dollar",
    "LSL": "Lesotho loti",
    "LYD": "Libyan dinar",
    "MAD": "Moroccan dirham",
    "MDL": "Moldovan leu",
    "MGA": "Malagasy ariary",
    "MKD": "Macedonian denar",
    "MMK": "Burmese kyat",
    "MNT": "Mongolian tugrik",
    "MOP": "Macanese pataca",
    "MRO": "Mauritanian ouguiya",
    "MUR": "Mauritian rupee",
    "MVR": "Maldivian rufiyaa",
    "MWK": "Malawian kwacha",
    "MXN": "Mexican peso",
    "MYR": "Malaysian ringgit",
    "MZN": "Mozambican metical",
    "NAD": "Namibian dollar",
    "NGN": "Nigerian naira",
    "NIO": "Nicaraguan cordoba",
    "NOK": "Norwegian krone",
    "NPR": "Nepalese rupee",
    "NZD": "New Zealand dollar",
    "OMR": "Omani rial",
    "PAB": "Panamanian balboa",
    "PEN": "Peruvian sol",
    "PGK": "Papua New Guinean kina",
    "PHP": "Philippine peso",
    "PKR": "Pakistani rupee",
    "PLN": "Polish zloty",
    "PYG": "Paraguayan guarani",
    "QAR": "Qatari riyal",
    "RON": "Romanian leu",
    "RSD": "Serbian dinar",
    "RUB": "Russian ruble",
    "RWF": "Rwandan franc",
    "SAR": "Saudi riyal",
    "SBD": "Solomon Islands dollar",
    "SCR": "Seychellois rupee",
    "SDG": "Sudanese pound",
    "SEK": "Swedish krona",
    "SGD": "Singapore dollar",
    "SHP": "Saint Helena pound",
    "SLL": "Sierra Leonean leone",
    "SOS": "Somali shilling",
    "SRD": "Surinamese dollar",
    "SSP": "South Sudanese pound",
    "STD": "Sao Tome and Principe dobra",
    "SVC": "Salvadoran colon",
    "SYP": "Syrian pound",
    "SZL": "Swazi lilangeni",
    "THB": "Thai baht",
    "TJS": "Tajikistani somoni",
    "TMT": "Turkmenistan manat",
    "TND": "Tunisian dinar",
    "TOP": "Tongan pa'anga",
    "TRY": "Turkish lira",
    "TTD": "Trinidad and Tobago dollar",
    "TWD": "New Taiwan dollar",
    "TZS": "Tanzanian shilling",
    "UAH": "Ukrainian hryvnia",
    "UGX": "Ugandan shilling",
    "USD": "United States dollar",
    "UYU": "Uruguayan peso",
    "UZS": "Uzbekistani som",
    "VEF": "Venezuelan bolivar",
    "VND": "Vietnamese dong",
    "VUV": "Vanuatu vatu",
    "WST": "Samoan tala",
    "XAF": "Central African CFA franc",
    "XCD": "East Caribbean dollar",
    "XOF": "West African CFA franc",
    "XPF": "CFP franc",
    "YER": "Yemeni rial",
    "ZAR": "South African rand",
    "ZMK": "Zambian kwacha",
}

LANGUAGES = {
    "af": "Afrikaans",
    "am": "Amharic",
    "ar": "Arabic",
    "ay": "Aymara",
    "az": "Azerbaijani",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bi": "Bislama",
    "bn": "Bengali",
    "bs": "Bosnian",
    "ca": "Catalan",
    "ch": "Chamorro",
    "cnr": "Montenegrin",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "dv": "Dhivehi",
    "dz": "Dzongkha",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "ff": "Fula",
    "fi": "Finnish",
    "fj": "Fijian",
    "fo": "Faroese",
    "fr": "French",
    "ga": "Irish",
    "gn": "Guarani",
    "gv": "Manx",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "ht": "Haitian Creole",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ka": "Georgian",
    "kg": "Kongo",
    "kk": "Kazakh",
    "kl": "Greenlandic",
    "km": "Khmer",
    "ko": "Korean",
    "ku": "Kurdish",
    "ky": "Kyrgyz",
    "la": "Latin",
    "lb": "Luxembourgish",
    "ln": "Lingala",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lu": "Luba-Katanga",
    "lv": "Latvian",
    "mg": "Malagasy",
    "mh": "Marshallese",
    "mi": "Maori",
    "mk": "Macedonian",
    "mn": "Mongolian",
    "ms": "Malay",
    "mt": "Maltese",
    "my": "Burmese",
    "na": "Nauruan",
    "nb": "Norwegian Bokmal",
    "nd": "Northern Ndebele",
    "ne": "Nepali",
    "nl": "Dutch",
    "nn": "Norwegian Nynorsk",
    "no": "Norwegian",
    "nr": "Southern Ndebele",
    "ny": "Chichewa",
    "oc": "Occitan",
    "pa": "Punjabi",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "qu": "Quechua",
    "rn": "Kirundi",
    "ro": "Romanian",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "sg": "Sango",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovene",
    "sm": "Samoan",
    "sn": "Shona",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "ss": "Swazi",
    "st": "Sotho",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "tg": "Tajik",
    "th": "Thai",
    "ti": "Tigrinya",
    "tk": "Turkmen",
    "tn": "Tswana",
    "to": "Tongan",
    "tr": "Turkish",
    "ts": "Tsonga",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "ve": "Venda",
    "vi": "Vietnamese",
    "xh": "Xhosa",
    "zh": "Chinese",
    "zu": "Zulu",
}


def region_label(region: str) -> str:
    """countryinfo's "Americas" reads as "the Americas" in a sentence."""
    return "the Americas" if region == "Americas" else region


def _capital(value) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    value = clean(value) if isinstance(value, str) else ""
    return "" if "/" in value else value


def read_countries(data_dir: str) -> list[dict]:
    """Normalised country dicts keyed by ISO alpha-3 code, sorted by code."""
    raw: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            continue
        code = clean((d.get("ISO") or {}).get("alpha3")) or clean(d["name"])
        if code not in raw or len(d) > len(raw[code]):
            raw[code] = d
    names = {code: clean(d["name"]) for code, d in raw.items()}
    out = []
    for code in sorted(raw):
        d = raw[code]
        demonym = clean(d.get("demonym")) if isinstance(d.get("demonym"), str) else ""
        population = d.get("population")
        out.append(
            dict(
                code=code,
                name=names[code],
                capital=_capital(d.get("capital")),
                region=region_label(clean(d.get("region"))) if isinstance(d.get("region"), str) else "",
                subregion=clean(d.get("subregion")) if isinstance(d.get("subregion"), str) else "",
                currencies=[CURRENCIES[c] for c in d.get("currencies") or [] if c in CURRENCIES],
                languages=[LANGUAGES[c] for c in d.get("languages") or [] if c in LANGUAGES],
                demonym="" if "," in demonym else demonym,
                population=population if isinstance(population, int) and population > 0 else None,
                borders=[b for b in d.get("borders") or [] if b in names and b != code],
            )
        )
    for c in out:
        c["border_names"] = [names[b] for b in c["borders"]]
    return out


def _population(n: int) -> str:
    if n >= 1_000_000:
        return f"about {round(n / 1_000_000):,} million"
    if n >= 1000:
        return f"about {round(n / 1000):,} thousand"
    return f"about {n:,}"


def country_text(c: dict) -> str:
    name = c["name"]
    if c["subregion"] and c["region"]:
        parts = [f"{name} is a country in {c['subregion']}, part of {c['region']}."]
    elif c["region"]:
        parts = [f"{name} is a country in {c['region']}."]
    else:
        parts = [f"{name} is a territory."]
    if c["capital"]:
        parts.append(f"Its capital is {c['capital']}.")
    if c["languages"]:
        langs = c["languages"]
        parts.append(
            f"The main language is {langs[0]}." if len(langs) == 1 else f"Its languages include {join_list(langs)}."
        )
    if c["currencies"]:
        parts.append(f"The currency is the {join_list(c['currencies'])}.")
    if c["demonym"]:
        parts.append(f"People from {name} are called {c['demonym']}.")
    if c["population"]:
        parts.append(f"It has a population of {_population(c['population'])}.")
    if c["border_names"]:
        parts.append(f"It borders {join_list(c['border_names'])}.")
    return clean(" ".join(parts))


def records_and_probes(data_dir: str) -> tuple[list[Record], list[Probe]]:
    countries = read_countries(data_dir)
    split = {c["code"]: split_of(f"country:{c['code']}") for c in countries}
    name_of = {c["code"]: c["name"] for c in countries}
    records, probes = [], []
    for c in countries:
        rid, name = f"country:{c['code']}", c["name"]
        records.append(Record(rid, country_text(c)))
        if c["capital"]:
            probes.append(Probe(rid, "country_capital", f"The capital city of {name} is", c["capital"]))
        if c["region"]:
            probes.append(Probe(rid, "country_region", f"{name} is a country in the world region of", c["region"]))
        if c["subregion"]:
            probes.append(
                Probe(
                    rid,
                    "country_subregion",
                    f"The United Nations geoscheme places {name} in the subregion",
                    c["subregion"],
                )
            )
        if c["currencies"]:
            probes.append(
                Probe(
                    rid,
                    "country_currency",
                    f"The official currency of {name} is the",
                    c["currencies"][0],
                    exclude=frozenset(c["currencies"]),
                )
            )
        if c["languages"]:
            probes.append(
                Probe(
                    rid,
                    "country_language",
                    f"The official language of {name} is",
                    c["languages"][0],
                    exclude=frozenset(c["languages"]),
                )
            )
        if c["demonym"] and c["demonym"] != name:
            probes.append(Probe(rid, "country_demonym", f"The demonym for people from {name} is", c["demonym"]))
        same_split = sorted(b for b in c["borders"] if split[b] == split[c["code"]])
        if same_split:
            answer = name_of[seeded_rng(f"border:{rid}").choice(same_split)]
            probes.append(
                Probe(
                    rid,
                    "country_border",
                    f"{name} shares a land border with",
                    answer,
                    exclude=frozenset(c["border_names"]) | {name},
                )
            )
    return records, probes
