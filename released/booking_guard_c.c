/*
 * booking_guard's booking path in C.
 *
 * Every booking fires booking_guard's triggers three times (call insert, call update,
 * appointment at COMMIT). Written in PL/pgSQL they cost more than the booking itself:
 * PL/pgSQL builds each expression's evaluation state again in every transaction, and a
 * SECURITY DEFINER ... SET search_path function switches and restores a GUC on every call
 * (bench/booking_tps.py measured 0.69 of the unattached TPS). Here the common path, a row
 * that no rule has anything to say about, costs one index probe and no GUC work. Whatever a
 * rule acts on (a correction, an alert, a rejection) is still decided in PL/pgSQL: the
 * calls trigger hands such a row to booking_guard.calls_rules(), and the commit-time check
 * to booking_guard.judge_call(). No function here is SECURITY DEFINER: each takes its owner's
 * rights around its queries only (spi_begin_as_owner).
 *
 * Two transaction-local marks replace the GUC booking_guard.verified_claim of 0.1.0:
 *   verified_claim  the call whose flags calls_before() last found true to its appointments
 *                   (the appointment-side check at COMMIT trusts it, see 110_truth_check.sql)
 *   unchecked_row   the calls row just written needs no commit-time check; the WHEN clause
 *                   of the calls-side constraint triggers reads it once and clears it.
 * A subtransaction abort clears both: without a mark, the check at COMMIT simply runs.
 *
 * Rules are read once per transaction (and again after any change to booking_guard.rules
 * in this session): a rule changed by another session applies from this session's next
 * transaction on.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/md5.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(calls_before);
PG_FUNCTION_INFO_V1(claim_check_needed);
PG_FUNCTION_INFO_V1(appointments_truth_check);
PG_FUNCTION_INFO_V1(rule_mode);
PG_FUNCTION_INFO_V1(rules_changed);

void		_PG_init(void);

/* ---- transaction-local marks ---- */

typedef struct CallMark
{
	bool		set;
	LocalTransactionId lxid;
	int64		call_id;
} CallMark;

static CallMark verified_claim;
static CallMark unchecked_row;

static void
mark_set(CallMark *mark, int64 call_id)
{
	mark->set = true;
	mark->lxid = MyProc->lxid;
	mark->call_id = call_id;
}

static bool
mark_is(const CallMark *mark, int64 call_id)
{
	return mark->set && mark->lxid == MyProc->lxid && mark->call_id == call_id;
}

/* ---- rules, read once per transaction ---- */

typedef enum RuleMode
{
	MODE_UNKNOWN,				/* no such rule: rule_mode() returns null */
	MODE_OFF,
	MODE_OBSERVE,
	MODE_CORRECT,
	MODE_ENFORCE
} RuleMode;

static const char *const mode_names[] = {NULL, "off", "observe", "correct", "enforce"};

typedef struct Rule
{
	NameData	name;
	RuleMode	mode;
	RuleMode	fallback_mode;
	int			rollout_percent;
} Rule;

static Rule *rules;
static int	nrules;
static bool rules_loaded;
static LocalTransactionId rules_lxid;

static SPIPlanPtr rules_plan;
static SPIPlanPtr probe_plan;
static SPIPlanPtr judge_plan;

static void
forget_transaction_state(SubXactEvent event, SubTransactionId mySubid,
						 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
	{
		verified_claim.set = false;
		unchecked_row.set = false;
		rules_loaded = false;
	}
}

void
_PG_init(void)
{
	RegisterSubXactCallback(forget_transaction_state, NULL);
}

static RuleMode
parse_mode(const char *text)
{
	for (int m = MODE_OFF; m <= MODE_ENFORCE; m++)
		if (strcmp(text, mode_names[m]) == 0)
			return (RuleMode) m;
	elog(ERROR, "booking_guard: unknown rule mode \"%s\"", text);
	return MODE_UNKNOWN;		/* keep the compiler quiet */
}

/* Every query here is schema-qualified down to its operators: it runs as the function's
 * owner under the caller's search_path. */
static SPIPlanPtr
prepare_kept(const char *query, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(query, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "booking_guard: SPI_prepare failed for \"%s\": %s", query,
			 SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "booking_guard: SPI_keepplan failed");
	return plan;
}

/*
 * The queries run with the rights of the function's owner, as SECURITY DEFINER would give,
 * but only around the queries, and with no search_path to switch: they name everything.
 * An error needs no restore here: the (sub)transaction abort restores the user.
 */
typedef struct AsOwner
{
	Oid			saved_user;
	int			saved_context;
} AsOwner;

static void
spi_begin_as_owner(Oid fn, AsOwner *as)
{
	HeapTuple	proc = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn));
	Oid			owner;

	if (!HeapTupleIsValid(proc))
		elog(ERROR, "booking_guard: cache lookup failed for function %u", fn);
	owner = ((Form_pg_proc) GETSTRUCT(proc))->proowner;
	ReleaseSysCache(proc);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	GetUserIdAndSecContext(&as->saved_user, &as->saved_context);
	SetUserIdAndSecContext(owner, as->saved_context | SECURITY_LOCAL_USERID_CHANGE);
}

static void
spi_end(AsOwner *as)
{
	SetUserIdAndSecContext(as->saved_user, as->saved_context);
	SPI_finish();
}

/* Runs a query with at most one bigint argument, preparing it on first use in the session. */
static void
run_kept(SPIPlanPtr *plan, const char *query, Datum *arg, bool read_only, long count, const char *what)
{
	Oid			argtypes[1] = {INT8OID};
	int			rc;

	if (*plan == NULL)
		*plan = prepare_kept(query, arg ? 1 : 0, argtypes);
	rc = SPI_execute_plan(*plan, arg, NULL, read_only, count);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "booking_guard: %s failed: %s", what, SPI_result_code_string(rc));
}

static void
load_rules(Oid fn)
{
	MemoryContext oldcxt;
	AsOwner		as;

	spi_begin_as_owner(fn, &as);
	run_kept(&rules_plan, "select r.name, r.mode, r.rollout_percent, r.fallback_mode from booking_guard.rules r",
			 NULL, true, 0, "reading booking_guard.rules");

	oldcxt = MemoryContextSwitchTo(TopMemoryContext);
	if (rules != NULL)
		pfree(rules);
	rules = palloc0(sizeof(Rule) * Max(SPI_processed, 1));
	MemoryContextSwitchTo(oldcxt);
	nrules = 0;
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	row = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Rule	   *rule = &rules[nrules++];
		bool		isnull;

		namestrcpy(&rule->name, SPI_getvalue(row, desc, 1));
		rule->mode = parse_mode(SPI_getvalue(row, desc, 2));
		rule->rollout_percent = DatumGetInt32(SPI_getbinval(row, desc, 3, &isnull));
		rule->fallback_mode = parse_mode(SPI_getvalue(row, desc, 4));
	}
	spi_end(&as);
	rules_loaded = true;
	rules_lxid = MyProc->lxid;
}

/* The same bucket as the SQL function booking_guard.rollout_bucket(): the first 32 bits of
 * md5(company_id) modulo 100. */
static int
rollout_bucket(const char *company)
{
	char		hex[33];
	char		first[9];
	const char *errstr = NULL;

	if (!pg_md5_hash(company, strlen(company), hex, &errstr))
		elog(ERROR, "booking_guard: md5 failed: %s", errstr);
	memcpy(first, hex, 8);
	first[8] = '\0';
	return (int) (strtoul(first, NULL, 16) % 100);
}

/* The company of a row, as text, computed only when a rollout below 100 % needs it. */
typedef struct Company
{
	bool		known;
	const char *text;			/* null company: "" as in rollout_bucket(null) */
	Datum		value;
	bool		isnull;
	Oid			type;
} Company;

static const char *
company_text(Company *company)
{
	if (!company->known)
	{
		if (company->isnull)
			company->text = "";
		else
		{
			Oid			output;
			bool		varlena;

			getTypeOutputInfo(company->type, &output, &varlena);
			company->text = OidOutputFunctionCall(output, company->value);
		}
		company->known = true;
	}
	return company->text;
}

/* fn: the function asking, whose owner reads the rules */
static RuleMode
mode_of(const char *rule_name, Company *company, Oid fn)
{
	if (!rules_loaded || rules_lxid != MyProc->lxid)
		load_rules(fn);
	for (int i = 0; i < nrules; i++)
	{
		Rule	   *rule = &rules[i];

		if (strcmp(NameStr(rule->name), rule_name) != 0)
			continue;
		if (rule->rollout_percent >= 100 || rollout_bucket(company_text(company)) < rule->rollout_percent)
			return rule->mode;
		return rule->fallback_mode;
	}
	return MODE_UNKNOWN;
}

static bool
corrects(RuleMode mode)
{
	return mode == MODE_CORRECT || mode == MODE_ENFORCE;
}

/* ---- reading and writing the application's rows ---- */

static bool
text_is(Datum value, bool isnull, const char *expected)
{
	text	   *t;
	size_t		len;

	if (isnull)
		return false;
	t = DatumGetTextPP(value);
	len = VARSIZE_ANY_EXHDR(t);
	return len == strlen(expected) && memcmp(VARDATA_ANY(t), expected, len) == 0;
}

static bool
text_distinct(Datum a, bool a_null, Datum b, bool b_null)
{
	text	   *ta;
	text	   *tb;

	if (a_null || b_null)
		return a_null != b_null;
	ta = DatumGetTextPP(a);
	tb = DatumGetTextPP(b);
	return VARSIZE_ANY_EXHDR(ta) != VARSIZE_ANY_EXHDR(tb)
		|| memcmp(VARDATA_ANY(ta), VARDATA_ANY(tb), VARSIZE_ANY_EXHDR(ta)) != 0;
}

static int64
id_value(Datum value, Oid type)
{
	return type == INT4OID ? (int64) DatumGetInt32(value) : DatumGetInt64(value);
}

typedef struct Column
{
	int			attnum;
	Oid			type;
	int32		typmod;
} Column;

static Column
column(Relation rel, const char *name)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Column		col;

	col.attnum = SPI_fnumber(desc, name);
	if (col.attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("booking_guard: table %s has no column %s", RelationGetRelationName(rel), name),
				 errhint("booking_guard.attach() checked this column: was it dropped since? Detach and attach again.")));
	col.type = TupleDescAttr(desc, col.attnum - 1)->atttypid;
	col.typmod = TupleDescAttr(desc, col.attnum - 1)->atttypmod;
	return col;
}

/* A text or varchar value for a column, with the column's length limit applied as an
 * assignment would. */
static Datum
text_for(Column col, const char *value)
{
	Datum		d = CStringGetTextDatum(value);

	if (col.type == VARCHAROID && col.typmod >= 0)
		d = DirectFunctionCall3(varchar, d, Int32GetDatum(col.typmod), BoolGetDatum(false));
	return d;
}

/* now() for a timestamptz or timestamp column. */
static Datum
now_for(Column col)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();

	if (col.type == TIMESTAMPOID)
		return DirectFunctionCall1(timestamptz_timestamp, TimestampTzGetDatum(now));
	return TimestampTzGetDatum(now);
}

/* ---- the calls trigger ---- */

typedef struct CallsTrigger
{
	Column		id, company_id, direction, session_outcome, appointment_made,
				appointment_link_status, appointment_linked_at, customer_id,
				customer_link_status, customer_linked_at, customer_link_method,
				customer_link_confidence;
	bool		rules_fn_ready;
	FmgrInfo	rules_fn;		/* booking_guard.calls_rules(): the seed's triggers 1-3 */
} CallsTrigger;

static CallsTrigger *
calls_trigger_state(FunctionCallInfo fcinfo, Relation rel)
{
	CallsTrigger *st = (CallsTrigger *) fcinfo->flinfo->fn_extra;

	if (st == NULL)
	{
		st = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(CallsTrigger));
		st->id = column(rel, "id");
		st->company_id = column(rel, "company_id");
		st->direction = column(rel, "direction");
		st->session_outcome = column(rel, "session_outcome");
		st->appointment_made = column(rel, "appointment_made");
		st->appointment_link_status = column(rel, "appointment_link_status");
		st->appointment_linked_at = column(rel, "appointment_linked_at");
		st->customer_id = column(rel, "customer_id");
		st->customer_link_status = column(rel, "customer_link_status");
		st->customer_linked_at = column(rel, "customer_linked_at");
		st->customer_link_method = column(rel, "customer_link_method");
		st->customer_link_confidence = column(rel, "customer_link_confidence");
		fcinfo->flinfo->fn_extra = st;
	}
	return st;
}

/* Runs booking_guard.calls_rules() on the row, as if it were the trigger; returns its row. */
static HeapTuple
apply_rules_in_plpgsql(FunctionCallInfo fcinfo, CallsTrigger *st)
{
	LOCAL_FCINFO(inner, 0);
	Datum		result;

	if (!st->rules_fn_ready)
	{
		Oid			fn = LookupFuncName(list_make2(makeString("booking_guard"), makeString("calls_rules")),
										0, NULL, false);

		fmgr_info_cxt(fn, &st->rules_fn, fcinfo->flinfo->fn_mcxt);
		st->rules_fn_ready = true;
	}
	InitFunctionCallInfoData(*inner, &st->rules_fn, 0, InvalidOid, fcinfo->context, NULL);
	result = FunctionCallInvoke(inner);
	if (inner->isnull)
		elog(ERROR, "booking_guard.calls_rules() returned null");
	return (HeapTuple) DatumGetPointer(result);
}

static bool
has_linked_appointment(int64 call_id, Oid fn)
{
	Datum		arg = Int64GetDatum(call_id);
	bool		found;
	AsOwner		as;

	spi_begin_as_owner(fn, &as);
	run_kept(&probe_plan, "select from booking_guard.guarded_appointments a "
			 "where a.call_id operator(pg_catalog.=) $1 limit 1", &arg, false, 1, "probing a call's appointments");
	found = SPI_processed > 0;
	spi_end(&as);
	return found;
}

/*
 * calls, BEFORE INSERT OR UPDATE, for each row. The seed's triggers 1-3 by their rules (in
 * PL/pgSQL, booking_guard.calls_rules(), whenever one of them has something to do; the plain
 * customer link here), then the claim against the truth: see calls_before() in
 * 100_consistency_triggers.sql for what each step means.
 */
Datum
calls_before(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	CallsTrigger *st;
	bool		is_insert;
	HeapTuple	newrow;
	HeapTuple	oldrow;
	Company		company = {0};
	bool		isnull, old_null;
	Datum		value, old_value;
	Datum		outcome, link;
	bool		outcome_null, link_null, made, made_null;
	bool		delegate = false;
	bool		link_customer = false;
	int64		call_id;
	bool		needs_check = false;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event)
		|| TRIGGER_FIRED_BY_DELETE(td->tg_event) || TRIGGER_FIRED_BY_TRUNCATE(td->tg_event))
		elog(ERROR, "booking_guard.calls_before() must be a BEFORE INSERT OR UPDATE row trigger");
	is_insert = TRIGGER_FIRED_BY_INSERT(td->tg_event);
	newrow = is_insert ? td->tg_trigtuple : td->tg_newtuple;
	oldrow = is_insert ? NULL : td->tg_trigtuple;
	desc = RelationGetDescr(td->tg_relation);
	st = calls_trigger_state(fcinfo, td->tg_relation);

	company.value = heap_getattr(newrow, st->company_id.attnum, desc, &company.isnull);
	company.type = st->company_id.type;

	/* 1. direction, 3a. phantom booking, 3b. flag against another outcome: all PL/pgSQL */
	(void) heap_getattr(newrow, st->direction.attnum, desc, &isnull);
	delegate = isnull;
	outcome = heap_getattr(newrow, st->session_outcome.attnum, desc, &outcome_null);
	value = heap_getattr(newrow, st->appointment_made.attnum, desc, &made_null);
	made = !made_null && DatumGetBool(value);
	if (text_is(outcome, outcome_null, "appointment_booked") ? !made : (made && !outcome_null))
		delegate = true;

	/* 2. customer link: on insert, and when customer_id changes */
	value = heap_getattr(newrow, st->customer_id.attnum, desc, &isnull);
	if (!delegate && !isnull)
	{
		bool		changed = is_insert;

		if (!is_insert)
		{
			old_value = heap_getattr(oldrow, st->customer_id.attnum, desc, &old_null);
			changed = old_null
				|| id_value(value, st->customer_id.type) != id_value(old_value, st->customer_id.type);
		}
		if (changed)
		{
			RuleMode	mode = mode_of("customer_link", &company, fcinfo->flinfo->fn_oid);
			bool		status_null;
			Datum		status = heap_getattr(newrow, st->customer_link_status.attnum, desc, &status_null);
			bool		linked = text_is(status, status_null, "linked");

			if (corrects(mode))
			{
				/* a status the application wrote that contradicts the customer: an alert */
				bool		written = is_insert;

				if (!is_insert && !status_null)
				{
					old_value = heap_getattr(oldrow, st->customer_link_status.attnum, desc, &old_null);
					written = text_distinct(status, false, old_value, old_null);
				}
				if (!linked && !status_null && written)
					delegate = true;
				else
					link_customer = true;
			}
			else if (mode == MODE_OBSERVE && !linked)
				delegate = true;
		}
	}

	if (delegate)
		newrow = apply_rules_in_plpgsql(fcinfo, st);
	else if (link_customer)
	{
		int			cols[4];
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};

		cols[0] = st->customer_link_status.attnum;
		values[0] = text_for(st->customer_link_status, "linked");
		cols[1] = st->customer_linked_at.attnum;
		values[1] = now_for(st->customer_linked_at);
		cols[2] = st->customer_link_method.attnum;
		values[2] = heap_getattr(newrow, cols[2], desc, &isnull);
		if (isnull)
			values[2] = text_for(st->customer_link_method, "phone_match");
		cols[3] = st->customer_link_confidence.attnum;
		values[3] = heap_getattr(newrow, cols[3], desc, &isnull);
		if (isnull)
			values[3] = DirectFunctionCall3(numeric_in, CStringGetDatum("100.00"), ObjectIdGetDatum(InvalidOid),
											Int32GetDatum(st->customer_link_confidence.typmod));
		newrow = heap_modify_tuple_by_cols(newrow, desc, 4, cols, values, nulls);
	}

	/* 4. the claim against the truth, now (see calls_before() in 100_consistency_triggers.sql) */
	call_id = id_value(heap_getattr(newrow, st->id.attnum, desc, &isnull), st->id.type);
	outcome = heap_getattr(newrow, st->session_outcome.attnum, desc, &outcome_null);
	link = heap_getattr(newrow, st->appointment_link_status.attnum, desc, &link_null);
	value = heap_getattr(newrow, st->appointment_made.attnum, desc, &made_null);
	made = !made_null && DatumGetBool(value);
	{
		bool		booked = text_is(outcome, outcome_null, "appointment_booked");
		bool		linked = text_is(link, link_null, "linked");
		bool		claims = made || booked || linked;
		bool		flags_written = is_insert ? claims : false;

		if (!is_insert)
		{
			bool		was_null;
			Datum		was = heap_getattr(oldrow, st->appointment_made.attnum, desc, &was_null);

			flags_written = made_null != was_null || (!made_null && DatumGetBool(value) != DatumGetBool(was));
			if (!flags_written)
			{
				was = heap_getattr(oldrow, st->session_outcome.attnum, desc, &was_null);
				flags_written = text_distinct(outcome, outcome_null, was, was_null);
			}
			if (!flags_written)
			{
				was = heap_getattr(oldrow, st->appointment_link_status.attnum, desc, &was_null);
				flags_written = text_distinct(link, link_null, was, was_null);
			}
		}
		if (flags_written)
		{
			bool		has_one = has_linked_appointment(call_id, fcinfo->flinfo->fn_oid);
			bool		verified;

			if (has_one && claims && !linked && corrects(mode_of("unlinked_appointment", &company, fcinfo->flinfo->fn_oid)))
			{
				int			cols[2];
				Datum		values[2];
				bool		nulls[2] = {false, false};

				cols[0] = st->appointment_link_status.attnum;
				values[0] = text_for(st->appointment_link_status, "linked");
				cols[1] = st->appointment_linked_at.attnum;
				values[1] = heap_getattr(newrow, cols[1], desc, &isnull);
				if (isnull)
					values[1] = now_for(st->appointment_linked_at);
				newrow = heap_modify_tuple_by_cols(newrow, desc, 2, cols, values, nulls);
				linked = true;
			}
			verified = (has_one && made && booked && linked) || !(claims || has_one);
			if (verified)
				mark_set(&verified_claim, call_id);
			else
				verified_claim.set = false;
			needs_check = !verified;
		}
	}
	if (needs_check)
		unchecked_row.set = false;
	else
		mark_set(&unchecked_row, call_id);
	return PointerGetDatum(newrow);
}

/*
 * The WHEN clause of the calls-side constraint triggers: does the row just written need the
 * truth check at COMMIT? Reads and clears the mark calls_before() left for it.
 */
Datum
claim_check_needed(PG_FUNCTION_ARGS)
{
	bool		skip = !PG_ARGISNULL(0) && mark_is(&unchecked_row, PG_GETARG_INT64(0));

	unchecked_row.set = false;
	PG_RETURN_BOOL(!skip);
}

/* ---- the appointments-side check at COMMIT ---- */

static void
judge_call(int64 call_id, Oid fn)
{
	Datum		arg = Int64GetDatum(call_id);
	AsOwner		as;

	spi_begin_as_owner(fn, &as);
	run_kept(&judge_plan, "select booking_guard.judge_call($1, false, true)", &arg, false, 0, "judging a call");
	spi_end(&as);
}

/*
 * appointments, deferred constraint trigger AFTER INSERT OR DELETE OR UPDATE OF call_id:
 * judges, at COMMIT, the calls whose appointments changed, except a call whose claim
 * calls_before() verified after this appointment was written (the usual booking).
 */
Datum
appointments_truth_check(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	Column	   *call_col = (Column *) fcinfo->flinfo->fn_extra;
	bool		new_null = true, old_null = true;
	Datum		new_call = 0, old_call = 0;
	int64		new_id = 0, old_id = 0;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event))
		elog(ERROR, "booking_guard.appointments_truth_check() must be an AFTER row trigger");
	desc = RelationGetDescr(td->tg_relation);
	if (call_col == NULL)
	{
		call_col = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(Column));
		*call_col = column(td->tg_relation, "call_id");
		fcinfo->flinfo->fn_extra = call_col;
	}
	if (!TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		HeapTuple	row = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple;

		new_call = heap_getattr(row, call_col->attnum, desc, &new_null);
		if (!new_null)
			new_id = id_value(new_call, call_col->type);
		if (!new_null && !mark_is(&verified_claim, new_id))
			judge_call(new_id, fcinfo->flinfo->fn_oid);
	}
	if (!TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		old_call = heap_getattr(td->tg_trigtuple, call_col->attnum, desc, &old_null);
		if (!old_null)
			old_id = id_value(old_call, call_col->type);
		if (!old_null && (TRIGGER_FIRED_BY_DELETE(td->tg_event) || new_null || new_id != old_id))
			judge_call(old_id, fcinfo->flinfo->fn_oid);
	}
	return PointerGetDatum(NULL);
}

/* ---- SQL-callable rule lookup ---- */

Datum
rule_mode(PG_FUNCTION_ARGS)
{
	Company		company = {0};
	RuleMode	mode;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	company.known = true;
	company.text = PG_ARGISNULL(1) ? "" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	mode = mode_of(text_to_cstring(PG_GETARG_TEXT_PP(0)), &company, fcinfo->flinfo->fn_oid);
	if (mode == MODE_UNKNOWN)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(mode_names[mode]));
}

/* Statement trigger on booking_guard.rules: this session reads the rules again. */
Datum
rules_changed(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "booking_guard.rules_changed() must be a trigger");
	rules_loaded = false;
	return PointerGetDatum(NULL);
}
