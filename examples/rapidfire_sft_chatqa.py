"""RapidFire AI's SFT tutorial notebook (`rf-tutorial-sft-chatqa`: a customer-support chatbot, LoRA configs gridded,
generation-based ROUGE-L), ported to rf. The cells are the notebook's; what changed, and why:

- the import lines (`rapidfireai` -> `rf_core.compat.rapidfire`);
- the model and data names: a built-in tiny local model and synthetic rows with the Bitext dataset's columns
  (`instruction`, `response`), since nothing downloads here; the step counts are cut to fit a CPU;
- `evaluate.load("rouge")` (which downloads) -> the built-in metric name `"rougeL"`;
- one addition: a policy that does an IC Op mid-fit (Clone-Modify, warm-started, switching the run's prompt
  format by name), as a user would from the dashboard's IC Ops panel or with `rf clone EXP RUN --set ...`.

Run it: `python examples/rapidfire_sft_chatqa.py` (about a minute on 2 CPU cores), then `rf runs rf-chatqa`.
"""

from rf_core import tiny_model_folder
from rf_core.compat.rapidfire import Experiment, List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from rf_core.policies import CloneModify, ExperimentSnapshot, Policy, PolicyOp

# ---- Load the dataset (the notebook: load_dataset("bitext/Bitext-customer-support-llm-chatbot-training-dataset"))
ISSUES = ["cancel my order", "track my package", "change my shipping address", "get a refund", "reset my password",
          "update my payment method", "talk to a human agent", "close my account"]  # fmt: skip
ANSWERS = ["I can help with that. Please share your order number and I will take care of it right away.",
           "Of course. Open the Orders page, choose the order, and follow the steps shown there.",
           "Thanks for reaching out. I have noted your request and a confirmation email is on its way."]  # fmt: skip
rows = [
    {"instruction": f"Hi, I need to {ISSUES[i % len(ISSUES)]} (ticket {i}).", "response": ANSWERS[i % len(ANSWERS)]}
    for i in range(80)
]
train_dataset, eval_dataset = rows[:64], rows[64:]

# ---- Formatting functions: the notebook's chat format, and a plain question/answer format to compare it with
SYSTEM_PROMPT = "You are a helpful and friendly customer support assistant. Please answer the user's query."


def sample_formatting_function(row):
    return {
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": row["instruction"]},
        ],
        "completion": [{"role": "assistant", "content": row["response"]}],
    }


def plain_formatting_function(row):
    return {"prompt": f"Question: {row['instruction']}\nAnswer:", "completion": " " + row["response"]}


# ---- The experiment
experiment = Experiment(experiment_name="rf-chatqa", mode="fit")

peft_configs = List(
    [
        RFLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], bias="none"),
        RFLoraConfig(r=32, lora_alpha=64, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     bias="none"),
    ]
)  # fmt: skip

config_set = List(
    [
        RFModelConfig(
            model_name=tiny_model_folder("rf-tiny-llama"),
            peft_config=peft_configs,
            training_args=RFSFTConfig(
                learning_rate=1e-3,
                lr_scheduler_type="linear",
                per_device_train_batch_size=8,
                per_device_eval_batch_size=8,
                gradient_accumulation_steps=1,
                max_steps=16,
                logging_steps=2,
                eval_strategy="steps",
                eval_steps=8,
                bf16=True,
                report_to="none",
                max_length=256,
            ),
            model_type="causal_lm",
            model_kwargs={"device_map": "auto", "torch_dtype": "auto", "use_cache": False},
            formatting_func=List([sample_formatting_function, plain_formatting_function]),
            compute_metrics="rougeL",
            generation_config={"max_new_tokens": 24, "temperature": 0.8, "top_p": 0.9, "top_k": 40,
                               "repetition_penalty": 1.18, "pad_token_id": None},
        )
    ]
)  # fmt: skip


def sample_create_model(model_config):
    """Function to create model object for any given config; must return tuple of (model, tokenizer)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_name = model_config["model_name"]
    model_type = model_config["model_type"]
    model_kwargs = model_config["model_kwargs"]
    if model_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(model_name, **model_kwargs)
    else:
        raise ValueError(f"unsupported model_type {model_type!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    return (model, tokenizer)


config_group = RFGridSearch(configs=config_set, trainer_type="SFT")


# ---- The one addition: an IC Op during the fit, as a policy
class TryTheOtherFormat(Policy):
    """After its first evaluation, clone the first chat-format run with the plain format, from its weights."""

    name = "try-the-other-format"

    def decide(self, snapshot: ExperimentSnapshot) -> list[PolicyOp]:
        if any(run.parent_id is not None for run in snapshot.runs):
            return []
        return [
            CloneModify(run.run_id, "same LoRA, plain prompts",
                        overrides={"formatting_func": "plain_formatting_function"}, warm_start="weights")
            for run in snapshot.trainable()
            if run.run_id == 1 and run.chunks_done >= 1
        ]  # fmt: skip


experiment.run_fit(config_group, sample_create_model, train_dataset, eval_dataset, num_chunks=2, seed=42,
                   policies=[TryTheOtherFormat()], metric="rougeL", mode="max")  # fmt: skip
experiment.end()

for run in experiment.get_runs_info().itertuples():
    print(f"run {run.run_id}: {run.status}, formatting_func={run.config['formatting_func']}, r={run.config['r']}")
results = experiment.get_results()  # one row per (run_id, step), a column per metric
print(f"results: {len(results)} rows, metrics {sorted(set(results.columns) - {'run_id', 'step'})}")
