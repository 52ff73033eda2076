/*
 * booking_guard's C module: the booking path's triggers, the switch to booking_guard_worker,
 * the job runner, the steps of record_booking() and the executor of declared rules.
 *
 * Why C:
 *   - The triggers fire on every booking. Written in PL/pgSQL they cost more than the booking
 *     itself (PL/pgSQL builds each expression's state again in every transaction). Here a row no
 *     rule has anything to say about costs one index probe. Whatever a rule acts on (a correction,
 *     an alert, a rejection) is still decided in PL/pgSQL (booking_guard_internal.calls_rules(),
 *     judge_call(), sync_call_flags()).
 *   - Identity. booking_guard writes the application's tables on its own account (a flag derived
 *     at COMMIT, a repair by a job), and the table owner's triggers, defaults, CHECKs and policies
 *     then run as whoever booking_guard runs as. That must never be a superuser, nor a role that
 *     owns anything. SECURITY DEFINER can only take the rights of a function's owner, and an owner
 *     can replace its functions; so this module switches to booking_guard_worker, a role that owns
 *     nothing, the way PostgreSQL's own maintenance commands switch to a table's owner: with a
 *     local user id change (no SET ROLE back), as a security-restricted operation (no temporary
 *     objects, no cursors left behind) and in a GUC nest level that is undone afterwards, so that
 *     code run as the worker cannot leave a setting behind for the caller.
 *   - Rules users declare. A declared rule's SQL runs as the role its declarer chose, switched to
 *     the same way (see "rules users declare" below): a SECURITY DEFINER function cannot switch
 *     to another role.
 *   - record_booking() is one C function: it has to cost what an application doing the same
 *     itself costs, and PL/pgSQL's own work per statement and expression was most of the
 *     difference (bench/record_booking.py measures both). It inserts a jsonb object into the attached appointments
 *     table with a plan kept here, keyed by table and set of keys: no session-level name the
 *     caller could prepare first (0.1.0 executed a prepared statement whose name the caller could
 *     predict). The rules it applies stay in PL/Python (validation_verdict()), what a refusal does
 *     in PL/pgSQL (booking_failed()). Its events are one kept statement run as
 *     booking_guard_owner (owner_queries), its booking id lock a lock no role can take from SQL
 *     (lock_booking_id()).
 *
 * Every query is schema-qualified down to its operators: it runs under the caller's search_path.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/detoast.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_am.h"
#include "catalog/partition.h"
#include "catalog/pg_index.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "common/md5.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "nodes/value.h"
#include "parser/parse_func.h"
#include "parser/parser.h"
#include "pgstat.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timeout.h"
#include "utils/plancache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(calls_before);
PG_FUNCTION_INFO_V1(calls_truth_check);
PG_FUNCTION_INFO_V1(claim_check_needed);
PG_FUNCTION_INFO_V1(commit_check_possible);
PG_FUNCTION_INFO_V1(appointments_sync);
PG_FUNCTION_INFO_V1(appointments_truth_check);
PG_FUNCTION_INFO_V1(rule_mode);
PG_FUNCTION_INFO_V1(rules_changed);
PG_FUNCTION_INFO_V1(store_declared_rule);
PG_FUNCTION_INFO_V1(declared_matches);
PG_FUNCTION_INFO_V1(declared_repair);
PG_FUNCTION_INFO_V1(run_job);
PG_FUNCTION_INFO_V1(run_job_steps);
PG_FUNCTION_INFO_V1(record_booking);
PG_FUNCTION_INFO_V1(attachment_changed);

void		_PG_init(void);

#define ERRCODE_BG_ATTACHMENT	MAKE_SQLSTATE('B','G','0','0','3')
#define ERRCODE_BG_NOT_FOUND	MAKE_SQLSTATE('B','G','0','0','4')
#define ERRCODE_BG_BAD_INPUT	MAKE_SQLSTATE('B','G','0','0','5')

#define WORKER_ROLE "booking_guard_worker"
#define OWNER_ROLE "booking_guard_owner"

/* ---- the switch to booking_guard_worker (or booking_guard_owner) ---- */

typedef struct AsWorker
{
	Oid			saved_user;
	int			saved_context;
	int			nest_level;
} AsWorker;

/* Runs as roleid until end_worker(): a local, security-restricted user id change, with the settings
 * changed meanwhile undone at the end. */
static void
become_role_id(AsWorker *as, Oid roleid)
{
	GetUserIdAndSecContext(&as->saved_user, &as->saved_context);
	SetUserIdAndSecContext(roleid, as->saved_context | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	as->nest_level = NewGUCNestLevel();
}

static void
become_role(AsWorker *as, const char *role, const char *why)
{
	Oid			roleid = get_role_oid(role, true);

	if (!OidIsValid(roleid))
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("role %s does not exist", role),
				 errdetail("%s; the extension creates it.", why),
				 errhint("Run ALTER EXTENSION booking_guard UPDATE, or drop and create the extension again.")));
	become_role_id(as, roleid);
}

static void
become_worker(AsWorker *as)
{
	become_role(as, WORKER_ROLE, "booking_guard writes the application's tables as this role");
}

/*
 * booking_guard_owner, for record_booking()'s writes to booking_guard's own tables (its booking id
 * lock, its events), which the application's roles may not write. Only the kept queries of
 * owner_queries below run as the owner: on tables no other role can put code on (triggers,
 * defaults, policies), naming everything down to its operators.
 */
static void
become_owner(AsWorker *as)
{
	become_role(as, OWNER_ROLE, "booking_guard's own tables belong to this role");
}

/* On error there is nothing to undo here: the (sub)transaction abort restores the user and the
 * settings. */
static void
end_worker(AsWorker *as)
{
	AtEOXact_GUC(false, as->nest_level);
	SetUserIdAndSecContext(as->saved_user, as->saved_context);
}

/* ---- transaction-local marks ---- */

/*
 *   verified_claim  the call whose flags calls_before() last found true to its appointments:
 *                   the appointment-side check at COMMIT trusts it
 *   unchecked_row   the calls row just written needs no commit-time check; the WHEN clause of
 *                   the calls-side constraint triggers reads it once and clears it
 * A subtransaction abort clears both: without a mark, the check at COMMIT simply runs.
 */
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

/*
 * The rules, read once per session and again after they change: a change to booking_guard.rules
 * invalidates the table's relcache entry in every session (rules_changed() below), and the callback
 * marks this copy stale. A transaction keeps the rules it read (one reading, not a query per row):
 * another session's change applies from this session's next transaction; its own change at once.
 */
static Rule *rules;
static int	nrules;
static bool rules_loaded;
static bool rules_invalidated;	/* by another session: read again from the next transaction */
static LocalTransactionId rules_lxid;
static Oid	rules_relid;

/*
 * The attachment, read once per session: the appointments table, the index that leads with
 * call_id (the claim's probe) and that column's type. attach() and detach() invalidate the relcache
 * entry of booking_guard.attached_tables (attachment_changed()), and any DDL on the appointments
 * table invalidates its own: either drops this copy.
 */
typedef struct Attachment
{
	bool		known;
	Oid			attached_relid;	/* booking_guard.attached_tables */
	Oid			calls;			/* InvalidOid: not attached */
	Oid			appointments;
	Oid			probe_index;	/* InvalidOid: probe with SQL */
	Oid			call_id_type;
} Attachment;

static Attachment attachment;

static SPIPlanPtr rules_plan;
static SPIPlanPtr probe_plan;
static SPIPlanPtr judge_plan;
static SPIPlanPtr judge_commit_plan;
static SPIPlanPtr sync_plan;

static void insert_plans_invalidate(Datum arg, Oid relid);
static void forget_kept_functions(Datum arg, int cacheid, uint32 hashvalue);
static bool is_attached(Relation rel, bool calls);

static void
forget_cached(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == rules_relid)
		rules_invalidated = true;
	if (relid == InvalidOid || relid == attachment.attached_relid || relid == attachment.appointments
		|| relid == attachment.calls)
		attachment.known = false;
}

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
	CacheRegisterRelcacheCallback(insert_plans_invalidate, (Datum) 0);
	CacheRegisterRelcacheCallback(forget_cached, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, forget_kept_functions, (Datum) 0);
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

/* Runs a kept query with bigint arguments (and at most one text argument after them), preparing it
 * on first use in the session. */
static void
run_kept(SPIPlanPtr *plan, const char *query, int nargs, Oid *argtypes, Datum *args, bool read_only,
		 long count, const char *what)
{
	int			rc;

	if (*plan == NULL)
		*plan = prepare_kept(query, nargs, argtypes);
	rc = SPI_execute_plan(*plan, args, NULL, read_only, count);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "booking_guard: %s failed: %s", what, SPI_result_code_string(rc));
}

static void
load_rules(void)
{
	MemoryContext oldcxt;
	AsWorker	as;

	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	run_kept(&rules_plan, "select r.name, r.mode, r.rollout_percent, r.fallback_mode from booking_guard.rules r",
			 0, NULL, NULL, true, 0, "reading booking_guard.rules");

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
	SPI_finish();
	end_worker(&as);
	rules_relid = get_relname_relid("rules", get_namespace_oid("booking_guard", false));
	rules_loaded = true;
	rules_invalidated = false;
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

static RuleMode
mode_of(const char *rule_name, Company *company)
{
	if (!rules_loaded || (rules_invalidated && rules_lxid != MyProc->lxid))
		load_rules();
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

/* What this module reads a column as. attach() checked the types, but a table owner may have
 * renamed a column since and added another of the old name (the event trigger refuses that, but
 * it can be disabled): every trigger call checks again before it reads a single datum. */
typedef enum ColumnKind
{
	KIND_ID,					/* integer or bigint */
	KIND_TEXT,					/* text or varchar */
	KIND_BOOL,
	KIND_TIMESTAMP,				/* timestamptz or timestamp */
	KIND_NUMERIC,
	KIND_ANY					/* only ever printed (company_id) */
} ColumnKind;

typedef struct Column
{
	int			attnum;
	Oid			type;
	int32		typmod;
} Column;

static bool
kind_accepts(ColumnKind kind, Oid type)
{
	switch (kind)
	{
		case KIND_ID:
			return type == INT4OID || type == INT8OID;
		case KIND_TEXT:
			return type == TEXTOID || type == VARCHAROID;
		case KIND_BOOL:
			return type == BOOLOID;
		case KIND_TIMESTAMP:
			return type == TIMESTAMPTZOID || type == TIMESTAMPOID;
		case KIND_NUMERIC:
			return type == NUMERICOID;
		case KIND_ANY:
			return true;
	}
	return false;
}

static const char *const kind_names[] = {"integer or bigint", "text or character varying", "boolean",
	"timestamp with or without time zone", "numeric", "any type"};

static Column
column(Relation rel, const char *name, ColumnKind kind)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Column		col;

	col.attnum = SPI_fnumber(desc, name);
	if (col.attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("booking_guard: table %s has no column %s", RelationGetRelationName(rel), name),
				 errdetail("booking_guard reads and writes this column on every row of the attached table."),
				 errhint("Give the column back, or run select booking_guard.detach(); until the table fits again.")));
	col.type = TupleDescAttr(desc, col.attnum - 1)->atttypid;
	col.typmod = TupleDescAttr(desc, col.attnum - 1)->atttypmod;
	if (!kind_accepts(kind, col.type))
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("booking_guard: column %s of table %s is %s, not %s", name, RelationGetRelationName(rel),
						format_type_be(col.type), kind_names[kind]),
				 errdetail("booking_guard reads this column on every row of the attached table, and will not read it as another type."),
				 errhint("Give the column its type back, or run select booking_guard.detach(); until the table fits again.")));
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

/* Looks up a function of booking_guard_internal by name and argument types. Run as the worker,
 * which may use that schema whoever the caller is. */
static Oid
internal_function(const char *name, int nargs, Oid *argtypes)
{
	return LookupFuncName(list_make2(makeString("booking_guard_internal"), makeString(pstrdup(name))),
						  nargs, argtypes, false);
}

/* ---- the calls trigger ---- */

typedef struct CallsTrigger
{
	bool		attached;		/* false: a leftover trigger, which does nothing */
	Column		id, company_id, direction, session_outcome, appointment_made,
				appointment_link_status, appointment_linked_at, customer_id,
				customer_link_status, customer_linked_at, customer_link_method,
				customer_link_confidence;
	bool		rules_fn_ready;
	FmgrInfo	rules_fn;		/* booking_guard_internal.calls_rules() */
} CallsTrigger;

static CallsTrigger *
calls_trigger_state(FunctionCallInfo fcinfo, Relation rel)
{
	CallsTrigger *st = (CallsTrigger *) fcinfo->flinfo->fn_extra;

	if (st == NULL)
	{
		st = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(CallsTrigger));
		fcinfo->flinfo->fn_extra = st;
		st->attached = is_attached(rel, true);
		if (!st->attached)
			return st;
		st->id = column(rel, "id", KIND_ID);
		st->company_id = column(rel, "company_id", KIND_ANY);
		st->direction = column(rel, "direction", KIND_TEXT);
		st->session_outcome = column(rel, "session_outcome", KIND_TEXT);
		st->appointment_made = column(rel, "appointment_made", KIND_BOOL);
		st->appointment_link_status = column(rel, "appointment_link_status", KIND_TEXT);
		st->appointment_linked_at = column(rel, "appointment_linked_at", KIND_TIMESTAMP);
		st->customer_id = column(rel, "customer_id", KIND_ID);
		st->customer_link_status = column(rel, "customer_link_status", KIND_TEXT);
		st->customer_linked_at = column(rel, "customer_linked_at", KIND_TIMESTAMP);
		st->customer_link_method = column(rel, "customer_link_method", KIND_TEXT);
		st->customer_link_confidence = column(rel, "customer_link_confidence", KIND_NUMERIC);
	}
	return st;
}

/* Runs booking_guard_internal.calls_rules() on the row, as the worker, as if it were the
 * trigger; returns its row. */
static HeapTuple
apply_rules_in_plpgsql(FunctionCallInfo fcinfo, CallsTrigger *st)
{
	LOCAL_FCINFO(inner, 0);
	Datum		result;
	AsWorker	as;

	become_worker(&as);
	if (!st->rules_fn_ready)
	{
		fmgr_info_cxt(internal_function("calls_rules", 0, NULL), &st->rules_fn, fcinfo->flinfo->fn_mcxt);
		st->rules_fn_ready = true;
	}
	InitFunctionCallInfoData(*inner, &st->rules_fn, 0, InvalidOid, fcinfo->context, NULL);
	result = FunctionCallInvoke(inner);
	if (inner->isnull)
		elog(ERROR, "booking_guard_internal.calls_rules() returned null");
	end_worker(&as);
	return (HeapTuple) DatumGetPointer(result);
}

static void
load_attachment(void)
{
	AsWorker	as;
	bool		isnull;
	Datum		value;

	memset(&attachment, 0, sizeof(attachment));
	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	if (SPI_execute("select a.appointments_table::pg_catalog.oid, 'booking_guard.attached_tables'::pg_catalog.regclass::pg_catalog.oid,"
					" a.calls_table::pg_catalog.oid"
					" from pg_catalog.pg_class c left join booking_guard.attached_tables a on true"
					" where c.oid operator(pg_catalog.=) 'booking_guard.attached_tables'::pg_catalog.regclass", true, 1)
		!= SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "booking_guard: reading booking_guard.attached_tables failed");
	value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	attachment.appointments = isnull ? InvalidOid : DatumGetObjectId(value);
	attachment.attached_relid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	value = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull);
	attachment.calls = isnull ? InvalidOid : DatumGetObjectId(value);
	SPI_finish();
	end_worker(&as);

	/* the probe: a plain table's valid btree index whose first column is call_id */
	if (OidIsValid(attachment.appointments) && get_rel_relkind(attachment.appointments) == RELKIND_RELATION)
	{
		Relation	rel = table_open(attachment.appointments, AccessShareLock);
		AttrNumber	call_id = get_attnum(attachment.appointments, "call_id");
		ListCell   *lc;

		if (call_id > 0)
			attachment.call_id_type = TupleDescAttr(RelationGetDescr(rel), call_id - 1)->atttypid;
		if (attachment.call_id_type == INT4OID || attachment.call_id_type == INT8OID)
		{
			foreach(lc, RelationGetIndexList(rel))
			{
				Relation	index = index_open(lfirst_oid(lc), AccessShareLock);
				bool		fits = index->rd_rel->relam == BTREE_AM_OID && index->rd_index->indisvalid
					&& index->rd_index->indkey.values[0] == call_id && heap_attisnull(index->rd_indextuple,
																					 Anum_pg_index_indpred, NULL)
					&& index->rd_opcintype[0] == attachment.call_id_type;

				index_close(index, AccessShareLock);
				if (fits)
				{
					attachment.probe_index = lfirst_oid(lc);
					break;
				}
			}
		}
		table_close(rel, AccessShareLock);
	}
	attachment.known = true;
}

/*
 * Is the trigger's table the attached one (itself, or one of its partitions)? A booking_guard
 * trigger on any other table is a leftover (a partial restore brings triggers back without their
 * attachment): it does nothing, until attach() takes it over or detach() removes it.
 */
static bool
is_attached(Relation rel, bool calls)
{
	Oid			relid = RelationGetRelid(rel);
	Oid			attached;

	if (!attachment.known)
		load_attachment();
	attached = calls ? attachment.calls : attachment.appointments;
	if (!OidIsValid(attached))
		return false;
	if (relid == attached)
		return true;
	return rel->rd_rel->relispartition && list_member_oid(get_partition_ancestors(relid), attached);
}

/*
 * Has the call an appointment? One index probe, read directly: no SQL, no user code (no policy,
 * no function) runs, so no identity needs switching. A partitioned table, or one without a
 * suitable index, is probed with SQL as the worker.
 *
 * Under READ COMMITTED the probe reads the latest committed state, not the statement's snapshot:
 * an appointment deleted by a transaction that committed after this statement began but before
 * it locked the call would otherwise still be seen, and a claim with nothing behind it would be
 * marked verified and skip the check at COMMIT. Under REPEATABLE READ and SERIALIZABLE the
 * transaction's snapshot is the truth it may act on.
 */
static bool
has_linked_appointment(int64 call_id)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		arg = Int64GetDatum(call_id);
	bool		found;
	AsWorker	as;

	if (!attachment.known)
		load_attachment();
	if (OidIsValid(attachment.probe_index))
	{
		Relation	heap;
		Relation	index;
		Snapshot	snapshot;
		IndexScanDesc scan;
		TupleTableSlot *slot;
		ScanKeyData key;

		if (attachment.call_id_type == INT4OID)
		{
			if (call_id < PG_INT32_MIN || call_id > PG_INT32_MAX)
				return false;	/* no int4 call_id holds it */
			ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT4EQ, Int32GetDatum((int32) call_id));
		}
		else
			ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(call_id));
		heap = table_open(attachment.appointments, AccessShareLock);
		index = index_open(attachment.probe_index, AccessShareLock);
		snapshot = IsolationUsesXactSnapshot() ? GetActiveSnapshot() : RegisterSnapshot(GetLatestSnapshot());
		scan = index_beginscan(heap, index, snapshot, 1, 0);
		index_rescan(scan, &key, 1, NULL, 0);
		slot = table_slot_create(heap, NULL);
		found = index_getnext_slot(scan, ForwardScanDirection, slot);
		index_endscan(scan);
		if (!IsolationUsesXactSnapshot())
			UnregisterSnapshot(snapshot);
		ExecDropSingleTupleTableSlot(slot);
		index_close(index, AccessShareLock);
		table_close(heap, AccessShareLock);
		return found;
	}

	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	run_kept(&probe_plan, "select from booking_guard_internal.guarded_appointments a "
			 "where a.call_id operator(pg_catalog.=) $1 limit 1", 1, argtypes, &arg,
			 IsolationUsesXactSnapshot(), 1, "probing a call's appointments");
	found = SPI_processed > 0;
	SPI_finish();
	end_worker(&as);
	return found;
}

/*
 * calls, BEFORE INSERT OR UPDATE, for each row:
 *   1. direction            rule missing_direction
 *   2. customer link        rule customer_link (the plain link here, anything else in PL/pgSQL)
 *   3. outcome vs flag      rules phantom_booking and outcome_flag_mismatch
 *   4. the claim against the truth, now. A call whose flags agree with its appointments is marked
 *      verified and the commit-time check skips it: this one index probe replaces a deferred
 *      check. The UPDATE that verified a claim holds the call's row lock until COMMIT, so no other
 *      transaction can change its appointments in between. A changed id is a new claim: it is
 *      always checked at COMMIT.
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
		elog(ERROR, "booking_guard_internal.calls_before() must be a BEFORE INSERT OR UPDATE row trigger");
	is_insert = TRIGGER_FIRED_BY_INSERT(td->tg_event);
	newrow = is_insert ? td->tg_trigtuple : td->tg_newtuple;
	oldrow = is_insert ? NULL : td->tg_trigtuple;
	desc = RelationGetDescr(td->tg_relation);
	st = calls_trigger_state(fcinfo, td->tg_relation);
	if (!st->attached)
		return PointerGetDatum(newrow);

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
			RuleMode	mode = mode_of("customer_link", &company);
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

	/* 4. the claim against the truth, now */
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
		bool		id_changed = false;

		if (!is_insert)
		{
			bool		was_null;
			Datum		was = heap_getattr(oldrow, st->id.attnum, desc, &was_null);

			id_changed = was_null || id_value(was, st->id.type) != call_id;
			was = heap_getattr(oldrow, st->appointment_made.attnum, desc, &was_null);
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
		if (id_changed)
		{
			/* the appointments still point at the old id: judge the call under its new one at COMMIT */
			verified_claim.set = false;
			needs_check = true;
		}
		else if (flags_written)
		{
			bool		has_one = has_linked_appointment(call_id);
			bool		verified;

			if (has_one && claims && !linked && corrects(mode_of("unlinked_appointment", &company)))
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
 * truth check at COMMIT? Reads and clears the mark calls_before() left for it. It runs as
 * whoever writes the calls table (EXECUTE is granted to PUBLIC) and tells only that. A write by
 * booking_guard itself (as the worker, a security-restricted operation: see below) needs none.
 */
Datum
claim_check_needed(PG_FUNCTION_ARGS)
{
	bool		skip = !PG_ARGISNULL(0) && mark_is(&unchecked_row, PG_GETARG_INT64(0));

	unchecked_row.set = false;
	PG_RETURN_BOOL(!skip && !InSecurityRestrictedOperation());
}

/*
 * The WHEN clause of the appointments-side constraint trigger. A deferred trigger cannot be queued
 * in a security-restricted operation (PostgreSQL refuses: it would run later with other rights),
 * and booking_guard's own writes as the worker are one: what they write is derived from the
 * appointments and needs no check at COMMIT (a moved appointment's calls are synced at once).
 */
Datum
commit_check_possible(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(!InSecurityRestrictedOperation());
}

/* ---- the checks at COMMIT and the appointment-side sync, as the worker ---- */

/* Runs one of the kept calls of a PL/pgSQL function on a call id as the worker. */
static void
call_as_worker(SPIPlanPtr *plan, const char *query, int64 call_id, const char *rule)
{
	Oid			argtypes[2] = {INT8OID, TEXTOID};
	Datum		args[2];
	AsWorker	as;

	args[0] = Int64GetDatum(call_id);
	args[1] = rule ? CStringGetTextDatum(rule) : (Datum) 0;
	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	run_kept(plan, query, rule ? 2 : 1, argtypes, args, false, 0, query);
	SPI_finish();
	end_worker(&as);
}

static void
judge_call(int64 call_id, bool appointments_changed)
{
	if (appointments_changed)
		call_as_worker(&judge_plan, "select booking_guard_internal.judge_call($1, false, true)", call_id, NULL);
	else
		call_as_worker(&judge_commit_plan, "select booking_guard_internal.judge_call($1)", call_id, NULL);
}

/* The column a trigger of the commit-time checks reads, per statement; NULL for a leftover
 * trigger (its table is not the attached one), which does nothing. */
typedef struct KeyColumn
{
	bool		attached;
	Column		col;
} KeyColumn;

static Column *
key_column(FunctionCallInfo fcinfo, Relation rel, bool calls, const char *name)
{
	KeyColumn  *key = (KeyColumn *) fcinfo->flinfo->fn_extra;

	if (key == NULL)
	{
		key = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(KeyColumn));
		fcinfo->flinfo->fn_extra = key;
		key->attached = is_attached(rel, calls);
		if (key->attached)
			key->col = column(rel, name, KIND_ID);
	}
	return key->attached ? &key->col : NULL;
}

/* The old and new call_id of an appointment row (absent: has = false). */
static void
appointment_calls(TriggerData *td, Column *col, bool *has_new, int64 *new_id, bool *has_old, int64 *old_id)
{
	TupleDesc	desc = RelationGetDescr(td->tg_relation);
	bool		isnull;
	Datum		value;

	*has_new = *has_old = false;
	if (!TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		HeapTuple	row = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple;

		value = heap_getattr(row, col->attnum, desc, &isnull);
		if (!isnull)
		{
			*has_new = true;
			*new_id = id_value(value, col->type);
		}
	}
	if (!TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		value = heap_getattr(td->tg_trigtuple, col->attnum, desc, &isnull);
		if (!isnull)
		{
			*has_old = true;
			*old_id = id_value(value, col->type);
		}
	}
}

/* calls, deferred constraint triggers AFTER INSERT and AFTER UPDATE (when claim_check_needed()):
 * the call's flags against its appointments, at COMMIT. */
Datum
calls_truth_check(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Column	   *id_col;
	HeapTuple	row;
	bool		isnull;
	Datum		value;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event))
		elog(ERROR, "booking_guard_internal.calls_truth_check() must be an AFTER row trigger");
	id_col = key_column(fcinfo, td->tg_relation, true, "id");
	if (id_col == NULL)
		return PointerGetDatum(NULL);
	row = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple;
	value = heap_getattr(row, id_col->attnum, RelationGetDescr(td->tg_relation), &isnull);
	if (!isnull)
		judge_call(id_value(value, id_col->type), false);
	return PointerGetDatum(NULL);
}

/*
 * appointments, AFTER DELETE OR UPDATE OF call_id, for each row: the flags of the calls that lost
 * or gained an appointment are recomputed at once (rule unlinked_appointment). The two calls of a
 * move are synced in id order: two sessions moving appointments in opposite directions between the
 * same two calls would otherwise each hold one call's row and wait for the other's.
 */
Datum
appointments_sync(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Column	   *col;
	bool		has_new, has_old;
	int64		new_id = 0, old_id = 0;
	int64		ids[2];
	int			n = 0;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event)
		|| TRIGGER_FIRED_BY_INSERT(td->tg_event))
		elog(ERROR, "booking_guard_internal.appointments_sync() must be an AFTER DELETE OR UPDATE row trigger");
	col = key_column(fcinfo, td->tg_relation, false, "call_id");
	if (col == NULL)
		return PointerGetDatum(NULL);
	appointment_calls(td, col, &has_new, &new_id, &has_old, &old_id);
	if (has_old)
		ids[n++] = old_id;
	if (has_new && !(has_old && new_id == old_id))
		ids[n++] = new_id;
	if (n == 2 && ids[1] < ids[0])
	{
		int64		t = ids[0];

		ids[0] = ids[1];
		ids[1] = t;
	}
	for (int i = 0; i < n; i++)
		call_as_worker(&sync_plan, "select booking_guard_internal.sync_call_flags($1, $2)", ids[i],
					   "unlinked_appointment");
	return PointerGetDatum(NULL);
}

/*
 * appointments, deferred constraint trigger AFTER INSERT OR DELETE OR UPDATE OF call_id: judges,
 * at COMMIT, the calls whose appointments changed, except a call whose claim calls_before()
 * verified after this appointment was written (the usual booking: appointment, then flags).
 */
Datum
appointments_truth_check(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Column	   *col;
	bool		has_new, has_old;
	int64		new_id = 0, old_id = 0;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event))
		elog(ERROR, "booking_guard_internal.appointments_truth_check() must be an AFTER row trigger");
	col = key_column(fcinfo, td->tg_relation, false, "call_id");
	if (col == NULL)
		return PointerGetDatum(NULL);
	appointment_calls(td, col, &has_new, &new_id, &has_old, &old_id);
	if (has_new && !mark_is(&verified_claim, new_id))
		judge_call(new_id, true);
	if (has_old && (TRIGGER_FIRED_BY_DELETE(td->tg_event) || !has_new || new_id != old_id))
		judge_call(old_id, true);
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
	mode = mode_of(text_to_cstring(PG_GETARG_TEXT_PP(0)), &company);
	if (mode == MODE_UNKNOWN)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(mode_names[mode]));
}

/* Statement trigger on booking_guard.rules: this session reads the rules again at once, every
 * other session once this transaction commits. */
Datum
rules_changed(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "booking_guard_internal.rules_changed() must be a trigger");
	rules_loaded = false;
	CacheInvalidateRelcacheByRelid(RelationGetRelid(td->tg_relation));
	return PointerGetDatum(NULL);
}

/* ---- rules users declare: their SQL runs as the role the administrator chose ---- */

/*
 * A declared rule's predicate (one boolean expression over a call, alias c, or an appointment,
 * alias a) and its repair statement ($1: the entity's id) are SQL that someone other than the
 * extension's installer wrote. They run as the rule's run_as role, switched to the way this module
 * switches to the worker (a local user id change, a security-restricted operation, a GUC nest level
 * undone afterwards), never as the caller, the worker or booking_guard_owner:
 *   - the declarer must be a member of run_as, so declaring a rule gives nobody rights they did not
 *     already have;
 *   - run_as may be neither a superuser nor a role holding the rights of booking_guard_owner or
 *     booking_guard_worker: checked when the rule is declared and again every time its SQL runs (a
 *     role can be given more after the declaration);
 *   - the SQL runs with search_path pg_catalog, pg_temp: whatever is not in pg_catalog is written
 *     schema-qualified, and nobody's schema can slip a function or an operator in front of it;
 *   - the predicate must parse as one expression, so that pasted into the query below it can
 *     neither close the WHERE clause's parenthesis nor add a clause or a statement; the repair must
 *     be one SELECT, INSERT, UPDATE or DELETE.
 * Only SQL stored in booking_guard.rules runs: no function here takes SQL from its caller except
 * store_declared_rule(), which checks it as above, and only stores it.
 */

#define DECLARED_SQL_MAX 4000
#define DECLARED_TIMEOUT_DEFAULT_MS 5000	/* the setting declared_rule_timeout's default */

/* As become_role_id(), with search_path pg_catalog, pg_temp: for a declared rule's SQL. */
static void
become_declared_role(AsWorker *as, Oid role)
{
	become_role_id(as, role);
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
}

static void
end_role(AsWorker *as)
{
	end_worker(as);
}

static char *
text_arg(FunctionCallInfo fcinfo, int n, const char *what)
{
	if (PG_ARGISNULL(n))
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("a declared rule needs its %s", what),
				 errdetail("%s: null", what),
				 errhint("See booking_guard.declare_rule().")));
	return text_to_cstring(PG_GETARG_TEXT_PP(n));
}

/* run_as may run a declared rule's SQL: an existing role, not a superuser, without the rights of
 * booking_guard_owner or booking_guard_worker. */
static void
check_run_as(Oid run_as, const char *rule_name)
{
	const char *const own[] = {OWNER_ROLE, WORKER_ROLE};
	char	   *name = GetUserNameFromId(run_as, true);

	if (name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_BG_NOT_FOUND),
				 errmsg("the role of rule \"%s\" does not exist", rule_name),
				 errdetail("The rule runs as role %u, which has been dropped.", run_as),
				 errhint("Declare the rule again with an existing role, or drop it: select booking_guard.drop_rule('%s');",
						 rule_name)));
	if (superuser_arg(run_as))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("rule \"%s\" may not run as %s: it is a superuser", rule_name, name),
				 errdetail("A declared rule's SQL runs with the rights of its role, and a superuser's have no limit."),
				 errhint("Make a role with just the rights the rule needs (SELECT on the attached tables, say) and declare the rule with it.")));
	for (int i = 0; i < lengthof(own); i++)
	{
		Oid			own_role = get_role_oid(own[i], true);

		if (OidIsValid(own_role) && is_member_of_role_nosuper(run_as, own_role))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("rule \"%s\" may not run as %s: it holds the rights of %s", rule_name, name, own[i]),
					 errdetail("booking_guard's own roles write its tables and the application's; a declared rule runs with less."),
					 errhint("Make a role with just the rights the rule needs and declare the rule with it.")));
	}
}

/* "select <predicate>" must be one bare target: then the predicate is one expression whose
 * parentheses balance, and it stays inside the parentheses it is pasted into. */
static void
check_one_expression(const char *predicate)
{
	List	   *raw = raw_parser(psprintf("select\n%s\n", predicate), RAW_PARSE_DEFAULT);
	SelectStmt *s = NULL;

	if (list_length(raw) == 1 && IsA(linitial_node(RawStmt, raw)->stmt, SelectStmt))
		s = (SelectStmt *) linitial_node(RawStmt, raw)->stmt;
	if (s == NULL || s->op != SETOP_NONE || list_length(s->targetList) != 1
		|| ((ResTarget *) linitial(s->targetList))->name != NULL
		|| s->distinctClause != NIL || s->intoClause != NULL || s->fromClause != NIL || s->whereClause != NULL
		|| s->groupClause != NIL || s->havingClause != NULL || s->windowClause != NIL || s->valuesLists != NIL
		|| s->sortClause != NIL || s->limitOffset != NULL || s->limitCount != NULL || s->lockingClause != NIL
		|| s->withClause != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("the predicate is not one expression"),
				 errdetail("A predicate is one boolean expression over the row, without FROM, WHERE, a second column or a ';'.")));
}

/* The repair is one SELECT, INSERT, UPDATE or DELETE (no SELECT INTO: it would create a table). */
static void
check_one_statement(const char *statement)
{
	List	   *raw = raw_parser(statement, RAW_PARSE_DEFAULT);
	Node	   *stmt = list_length(raw) == 1 ? linitial_node(RawStmt, raw)->stmt : NULL;

	if (stmt == NULL
		|| !(IsA(stmt, UpdateStmt) || IsA(stmt, InsertStmt) || IsA(stmt, DeleteStmt)
			 || (IsA(stmt, SelectStmt) && ((SelectStmt *) stmt)->intoClause == NULL)))
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("the repair is not one SELECT, INSERT, UPDATE or DELETE statement"),
				 errdetail("A repair is one statement, run once per finding with $1 the entity's id.")));
}

/* The query a predicate runs in: the given ids of the entity's attached table, each looked up by
 * its key (a lateral lookup the planner cannot turn into a join: a hash semi-join would read the
 * whole table for a batch of a thousand ids; never "= any (array)", which compares each row with
 * the whole array), restricted by the predicate. */
static char *
predicate_query(bool is_call, const char *predicate, Oid table)
{
	const char *alias = is_call ? "c" : "a";
	char	   *name = get_rel_name(table);

	if (name == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("the attached %s table no longer exists", is_call ? "calls" : "appointments"),
				 errdetail("booking_guard.attached_tables names relation %u.", table),
				 errhint("select booking_guard.detach(); then attach the tables again.")));
	return psprintf("select %s.id::pg_catalog.int8\n"
					"  from (select distinct pg_catalog.unnest($1::pg_catalog.int8[]) as id) as booking_guard_ids\n"
					" cross join lateral (select * from %s as x\n"
					"                      where x.id operator(pg_catalog.=) booking_guard_ids.id offset 0) as %s\n"
					" where (\n%s\n)",
					alias, quote_qualified_identifier(get_namespace_name(get_rel_namespace(table)), name),
					alias, predicate);
}

/* Parses and plans a rule's SQL as the current role (the rule's) and checks that role's
 * privileges on every table it reads or writes, without running it. */
static void
plan_and_check(const char *query, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(query, nargs, argtypes);
	CachedPlan *cplan;
	ListCell   *lc;

	if (plan == NULL)
		elog(ERROR, "booking_guard: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (list_length(SPI_plan_get_plan_sources(plan)) != 1)
		ereport(ERROR, (errcode(ERRCODE_SYNTAX_ERROR), errmsg("more than one statement")));
	cplan = SPI_plan_get_cached_plan(plan);
	foreach(lc, cplan->stmt_list)
	{
		PlannedStmt *ps = lfirst_node(PlannedStmt, lc);

		(void) ExecCheckRTPerms(ps->rtable, true);
	}
	ReleaseCachedPlan(cplan, NULL);
	SPI_freeplan(plan);
}

typedef void (*RawCheck) (const char *sql);

/* One part of a rule being declared (its predicate or its repair), checked as run_as in a
 * subtransaction: any error, the parser's first, becomes BG005 carrying its message. */
static void
validate_part(const char *rule_name, const char *part, Oid run_as, RawCheck raw_check, const char *sql,
			  const char *query, int nargs, Oid *argtypes)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		AsWorker	as;

		raw_check(sql);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "booking_guard: SPI_connect failed");
		become_declared_role(&as, run_as);
		plan_and_check(query, nargs, argtypes);
		end_role(&as);
		SPI_finish();
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *e;

		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("invalid %s for rule \"%s\": %s", part, rule_name, e->message),
				 errdetail("%s%sChecked as role %s, with search_path pg_catalog, pg_temp, in:\n%s",
						   e->detail ? e->detail : "", e->detail ? "\n" : "",
						   GetUserNameFromId(run_as, false), query),
				 e->hint ? errhint("%s", e->hint)
				 : errhint("The predicate is one boolean expression over c (a call) or a (an appointment); the repair one "
						   "statement with $1 the id. Schema-qualify every name outside pg_catalog; the role needs "
						   "the privileges the SQL uses.")));
	}
	PG_END_TRY();
}

/* The attached tables, read as the worker; BG003 when nothing is attached. */
static void
attached_tables(Oid *calls, Oid *appointments)
{
	AsWorker	as;
	bool		isnull;

	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	if (SPI_execute("select a.calls_table::pg_catalog.oid, a.appointments_table::pg_catalog.oid"
					"  from booking_guard.attached_tables a", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "booking_guard: reading booking_guard.attached_tables failed");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("booking_guard is not attached"),
				 errdetail("A declared rule's predicate reads the attached calls or appointments table."),
				 errhint("select booking_guard.attach('public.calls', 'public.appointments');")));
	*calls = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	*appointments = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	SPI_finish();
	end_worker(&as);
}

/*
 * booking_guard_internal.store_declared_rule(rule_name, entity, predicate, repair_statement, run_as,
 * severity, mode, description, label): checks a rule (the declarer's membership in run_as, run_as,
 * the SQL as run_as) and stores it as booking_guard_owner. declare_rule() calls it after checking
 * the rest of its input; a bad value that gets here directly is refused by the table's constraints.
 */
Datum
store_declared_rule(PG_FUNCTION_ARGS)
{
	char	   *rule_name = text_arg(fcinfo, 0, "name");
	char	   *entity = text_arg(fcinfo, 1, "entity");
	char	   *predicate = text_arg(fcinfo, 2, "predicate");
	char	   *repair = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	Oid			run_as;
	Oid			declarer = GetUserId();
	Oid			calls, appointments;
	bool		is_call;
	Oid			array_type[1] = {INT8ARRAYOID};
	Oid			id_type[1] = {INT8OID};
	Oid			insert_types[11] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, OIDOID,
								TEXTOID, TEXTOID};
	Datum		values[11];
	char		nulls[11] = "           ";
	AsWorker	as;
	int			rc;

	if (PG_ARGISNULL(4))
		(void) text_arg(fcinfo, 4, "run_as role");
	run_as = PG_GETARG_OID(4);
	for (int i = 5; i <= 8; i++)
		(void) text_arg(fcinfo, i, i == 5 ? "severity" : i == 6 ? "mode" : i == 7 ? "description" : "label");

	if (!is_member_of_role(declarer, run_as))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to declare rule \"%s\" to run as %s", rule_name,
						GetUserNameFromId(run_as, false)),
				 errdetail("Role %s is not a member of %s: the rule's SQL would run with rights %s does not have.",
						   GetUserNameFromId(declarer, false), GetUserNameFromId(run_as, false),
						   GetUserNameFromId(declarer, false)),
				 errhint("Declare the rule to run as a role you are a member of.")));
	check_run_as(run_as, rule_name);
	if (strcmp(entity, "call") != 0 && strcmp(entity, "appointment") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("invalid entity for rule \"%s\": \"%s\"", rule_name, entity),
				 errdetail("A declared rule looks at calls or at appointments."),
				 errhint("Give entity 'call' (the predicate reads c) or 'appointment' (it reads a).")));
	if (strlen(predicate) > DECLARED_SQL_MAX || (repair != NULL && strlen(repair) > DECLARED_SQL_MAX))
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("the SQL of rule \"%s\" is too long", rule_name),
				 errdetail("A predicate and a repair statement are at most %d characters each.", DECLARED_SQL_MAX),
				 errhint("Put a long condition in a function of your own and call it from the predicate.")));
	is_call = strcmp(entity, "call") == 0;
	attached_tables(&calls, &appointments);

	validate_part(rule_name, "predicate", run_as, check_one_expression, predicate,
				  predicate_query(is_call, predicate, is_call ? calls : appointments), 1, array_type);
	if (repair != NULL)
		validate_part(rule_name, "repair statement", run_as, check_one_statement, repair, repair, 1, id_type);

	/* stored as booking_guard_owner: the declarer has no right to write booking_guard.rules itself */
	values[0] = CStringGetTextDatum(rule_name);
	values[1] = CStringGetTextDatum(entity);
	values[2] = CStringGetTextDatum(predicate);
	values[3] = repair ? CStringGetTextDatum(repair) : (Datum) 0;
	nulls[3] = repair ? ' ' : 'n';
	for (int i = 5; i <= 8; i++)
		values[i - 1] = PG_GETARG_DATUM(i);		/* severity, mode, description, label */
	values[8] = ObjectIdGetDatum(run_as);
	values[9] = CStringGetTextDatum(GetUserNameFromId(declarer, false));
	values[10] = CStringGetTextDatum(GetUserNameFromId(GetSessionUserId(), false));
	become_declared_role(&as, get_role_oid(OWNER_ROLE, false));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	rc = SPI_execute_with_args(
		"insert into booking_guard.rules (name, entity_type, source, predicate, repair_statement, repair_kind, repair,"
		"                                 severity, mode, default_mode, description, alert_text, action, label,"
		"                                 run_as, declared_by, declared_at, updated_at, updated_by)"
		" select $1, $2, $2 operator(pg_catalog.||) 's', $3, $4,"
		"        case when $4 is not null then 'statement' end,"
		"        case when $4 is not null"
		"             then 'runs the rule''s repair statement as ' operator(pg_catalog.||) $9::pg_catalog.regrole::pg_catalog.text end,"
		"        $5, $6, $6, $7, $7, $7, $8, $9::pg_catalog.regrole, $10::pg_catalog.name,"
		"        pg_catalog.now(), pg_catalog.now(), $11::pg_catalog.name"
		"  where not exists (select from booking_guard.rules r where r.name operator(pg_catalog.=) $1 and r.predicate is null)",
		11, insert_types, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "booking_guard: storing rule \"%s\" failed: %s", rule_name, SPI_result_code_string(rc));
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("rule \"%s\" is built in", rule_name),
				 errdetail("A declared rule cannot take the name of a built-in one."),
				 errhint("Choose another name.")));
	rc = SPI_execute_with_args(
		"select booking_guard_internal.log_event('rule', $1, null, null,"
		"           pg_catalog.jsonb_build_object('declared', true, 'run_as', $9::pg_catalog.regrole::pg_catalog.text,"
		"                                         'by', $10::pg_catalog.text, 'mode', $6::pg_catalog.text))",
		11, insert_types, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "booking_guard: logging rule \"%s\" failed: %s", rule_name, SPI_result_code_string(rc));
	SPI_finish();
	end_role(&as);
	PG_RETURN_VOID();
}

/* What a declared rule runs, read as the worker: its entity, predicate, repair statement, role
 * and the attached table of its entity. BG004 when no declared rule has this name. */
typedef struct DeclaredRule
{
	bool		is_call;
	char	   *predicate;
	char	   *repair;			/* null: none */
	Oid			run_as;
	char	   *declared_by;	/* the role that declared it, by name */
	Oid			table;
	int			timeout_ms;		/* the setting declared_rule_timeout */
} DeclaredRule;

static SPIPlanPtr declared_plan;

static DeclaredRule
declared_rule(const char *rule_name)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		arg = CStringGetTextDatum(rule_name);
	DeclaredRule rule;
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	bool		timeout_isnull;
	AsWorker	as;
	MemoryContext upper = CurrentMemoryContext;

	become_worker(&as);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	run_kept(&declared_plan,
			 "select r.entity_type operator(pg_catalog.=) 'call', r.predicate, r.repair_statement,"
			 "       r.run_as::pg_catalog.oid,"
			 "       case when r.entity_type operator(pg_catalog.=) 'call' then a.calls_table"
			 "            else a.appointments_table end::pg_catalog.oid,"
			 "       (select (pg_catalog.date_part('epoch', s.interval_value) operator(pg_catalog.*) 1000)::pg_catalog.int4"
			 "          from booking_guard.settings s where s.name operator(pg_catalog.=) 'declared_rule_timeout'),"
			 "       r.declared_by::pg_catalog.text"
			 "  from booking_guard.rules r left join booking_guard.attached_tables a on true"
			 " where r.name operator(pg_catalog.=) $1 and r.predicate is not null",
			 1, argtypes, &arg, true, 1, "reading a declared rule");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_BG_NOT_FOUND),
				 errmsg("no declared rule \"%s\"", rule_name),
				 errdetail("booking_guard.rules has no declared rule (one with a predicate) of this name."),
				 errhint("select name, entity_type, run_as from booking_guard.rules where predicate is not null;")));
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	rule.is_call = DatumGetBool(SPI_getbinval(row, desc, 1, &isnull));
	rule.run_as = DatumGetObjectId(SPI_getbinval(row, desc, 4, &isnull));
	rule.timeout_ms = DatumGetInt32(SPI_getbinval(row, desc, 6, &timeout_isnull));
	if (timeout_isnull || rule.timeout_ms <= 0)
		rule.timeout_ms = DECLARED_TIMEOUT_DEFAULT_MS;
	rule.table = DatumGetObjectId(SPI_getbinval(row, desc, 5, &isnull));
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("booking_guard is not attached"),
				 errdetail("Rule \"%s\" reads the attached %s table.", rule_name, rule.is_call ? "calls" : "appointments"),
				 errhint("select booking_guard.attach('public.calls', 'public.appointments');")));
	rule.predicate = MemoryContextStrdup(upper, SPI_getvalue(row, desc, 2));
	rule.repair = SPI_getvalue(row, desc, 3);
	if (rule.repair != NULL)
		rule.repair = MemoryContextStrdup(upper, rule.repair);
	rule.declared_by = MemoryContextStrdup(upper, SPI_getvalue(row, desc, 7));
	SPI_finish();
	end_worker(&as);
	/* checked again each time: the role may have been given more since, the row may come from a restore */
	check_run_as(rule.run_as, rule_name);
	/* and the declarer must still be a member of run_as: one whose membership was revoked (or who
	 * was dropped) could otherwise go on running SQL as run_as through a function the predicate
	 * calls and the declarer can still replace */
	{
		Oid			declarer = get_role_oid(rule.declared_by, true);

		if (!OidIsValid(declarer) || !is_member_of_role(declarer, rule.run_as))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("rule \"%s\" may no longer run as %s: its declarer %s is not a member of it",
							rule_name, GetUserNameFromId(rule.run_as, false), rule.declared_by),
					 errdetail("A declared rule runs only as a role its declarer could become: checked when it is declared "
							   "and every time it runs."),
					 errhint("Declare the rule again as a member of the role, or drop it: select booking_guard.drop_rule('%s');",
							 rule_name)));
	}
	check_one_expression(rule.predicate);
	if (rule.repair != NULL)
		check_one_statement(rule.repair);
	return rule;
}

/*
 * A declared rule's SQL runs for at most the setting declared_rule_timeout (each predicate on one
 * batch, each repair on one finding): a rule that loops or waits would otherwise hold the monitor,
 * reconcile and their batch's locks for as long as it likes. Its own timer, not statement_timeout:
 * that one is armed when a client's statement starts and cannot be shortened inside one. When it
 * fires the rule's SQL is cancelled and BG005 says which rule; declared_findings() turns that into
 * a warning like any other error of the rule's SQL, and the monitor goes on with the other rules.
 */
static TimeoutId declared_timeout = MAX_TIMEOUTS;	/* MAX_TIMEOUTS: not registered yet */
static volatile sig_atomic_t declared_timed_out = false;

static void
declared_timeout_handler(void)
{
	/* what a client's cancel request does: the next CHECK_FOR_INTERRUPTS() raises the error */
	declared_timed_out = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

/* Runs a rule's SQL (a prepared plan, or a statement with one argument) under the rule's timer. */
static int
execute_bounded(const char *rule_name, const char *part, int timeout_ms, SPIPlanPtr plan, const char *sql,
				Oid *argtypes, Datum *args, bool read_only)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			rc = 0;

	if (declared_timeout == MAX_TIMEOUTS)
		declared_timeout = RegisterTimeout(USER_TIMEOUT, declared_timeout_handler);
	declared_timed_out = false;
	enable_timeout_after(declared_timeout, timeout_ms);
	PG_TRY();
	{
		rc = plan != NULL ? SPI_execute_plan(plan, args, NULL, read_only, 0)
			: SPI_execute_with_args(sql, 1, argtypes, args, NULL, read_only, 0);
	}
	PG_CATCH();
	{
		disable_timeout(declared_timeout, false);
		if (declared_timed_out)
		{
			declared_timed_out = false;
			MemoryContextSwitchTo(cxt);
			FlushErrorState();
			ereport(ERROR,
					(errcode(ERRCODE_BG_BAD_INPUT),
					 errmsg("the %s of rule \"%s\" ran longer than %d ms and was cancelled", part, rule_name, timeout_ms),
					 errdetail("A declared rule's SQL runs for at most the setting declared_rule_timeout each time."),
					 errhint("Make the rule cheaper (it runs on a batch of ids, each looked up by key), raise the setting "
							 "(select booking_guard.set_setting('declared_rule_timeout', '10 seconds');), or turn the rule "
							 "off: select booking_guard.set_rule('%s', 'off');", rule_name)));
		}
		PG_RE_THROW();
	}
	PG_END_TRY();
	disable_timeout(declared_timeout, false);
	if (declared_timed_out)
	{
		/* fired as the SQL ended: it finished in time, the pending cancel was ours */
		declared_timed_out = false;
		QueryCancelPending = false;
	}
	return rc;
}

/*
 * booking_guard_internal.declared_matches(rule_name, ids bigint[]) returns bigint[]: the ids among
 * the given ones (calls or appointments, as the rule's entity) for which the declared rule's
 * predicate holds, the predicate run as the rule's role. Errors of the rule's SQL are raised as
 * they are (declared_findings() turns them into a warning).
 */
Datum
declared_matches(PG_FUNCTION_ARGS)
{
	char	   *rule_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Datum		ids = PG_GETARG_DATUM(1);
	DeclaredRule rule = declared_rule(rule_name);
	Oid			argtypes[1] = {INT8ARRAYOID};
	MemoryContext upper = CurrentMemoryContext;
	SPIPlanPtr	plan;
	AsWorker	as;
	Datum	   *found;
	int			rc;
	int			n;
	ArrayType  *result;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	become_declared_role(&as, rule.run_as);
	plan = SPI_prepare(predicate_query(rule.is_call, rule.predicate, rule.table), 1, argtypes);
	if (plan == NULL)
		elog(ERROR, "booking_guard: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	rc = execute_bounded(rule_name, "predicate", rule.timeout_ms, plan, NULL, argtypes, &ids, true);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "booking_guard: the predicate of rule \"%s\" failed: %s", rule_name, SPI_result_code_string(rc));
	end_role(&as);
	n = (int) SPI_processed;
	found = MemoryContextAlloc(upper, sizeof(Datum) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		bool		isnull;

		found[i] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
	}
	{
		MemoryContext spi = MemoryContextSwitchTo(upper);

		result = construct_array(found, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
		MemoryContextSwitchTo(spi);
	}
	SPI_finish();
	PG_RETURN_ARRAYTYPE_P(result);
}

/*
 * booking_guard_internal.declared_repair(rule_name, entity_id bigint) returns bigint: runs the
 * declared rule's repair statement, $1 the entity's id, as the rule's role; returns the rows it
 * processed.
 */
Datum
declared_repair(PG_FUNCTION_ARGS)
{
	char	   *rule_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Datum		id = PG_GETARG_DATUM(1);
	DeclaredRule rule = declared_rule(rule_name);
	Oid			argtypes[1] = {INT8OID};
	AsWorker	as;
	int			rc;
	uint64		processed;

	if (rule.repair == NULL)
		PG_RETURN_INT64(0);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	become_declared_role(&as, rule.run_as);
	rc = execute_bounded(rule_name, "repair", rule.timeout_ms, NULL, rule.repair, argtypes, &id, false);
	if (rc < 0)
		elog(ERROR, "booking_guard: the repair of rule \"%s\" failed: %s", rule_name, SPI_result_code_string(rc));
	processed = SPI_processed;
	end_role(&as);
	SPI_finish();
	PG_RETURN_INT64((int64) processed);
}

/* attach() and detach(): every session reads the attachment again once this transaction commits. */
Datum
attachment_changed(PG_FUNCTION_ARGS)
{
	Oid			relid = get_relname_relid("attached_tables", get_namespace_oid("booking_guard", false));

	attachment.known = false;
	if (OidIsValid(relid))
		CacheInvalidateRelcacheByRelid(relid);
	PG_RETURN_VOID();
}

/* ---- jobs: step by step as the worker, committing between steps where the caller allows ---- */

/*
 * A job is run by the steps of booking_guard_internal.job_begin(), job_step() and job_end(), each
 * returning the job's state (jsonb, with "done" once there is nothing left). Who may run a job is
 * who may execute its public function: one place (the grants) says it.
 */
static const struct
{
	const char *job;
	const char *entry;
}			job_entries[] = {
	{"run_monitor", "booking_guard.run_monitor(pg_catalog.interval)"},
	{"verify_due", "booking_guard.verify_due(pg_catalog.timestamptz)"},
	{"reconcile", "booking_guard.reconcile(pg_catalog.int4)"},
	{"daily_report", "booking_guard.store_daily_report(pg_catalog.date)"},
	{"purge", "booking_guard.purge()"},
};

static void
check_may_run(const char *job)
{
	for (int i = 0; i < lengthof(job_entries); i++)
	{
		if (strcmp(job_entries[i].job, job) != 0)
			continue;
		{
			Oid			entry = DatumGetObjectId(DirectFunctionCall1(regprocedurein,
																	CStringGetDatum(job_entries[i].entry)));

			if (pg_proc_aclcheck(entry, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("permission denied to run booking_guard job %s", job),
						 errdetail("Running the job %s needs EXECUTE on %s.", job, job_entries[i].entry),
						 errhint("Grant booking_guard_admin (every job) or booking_guard_serve (verify_due) to the role.")));
			return;
		}
	}
	{
		StringInfoData known;

		initStringInfo(&known);
		for (int i = 0; i < lengthof(job_entries); i++)
			appendStringInfo(&known, "%s%s", i ? ", " : "", job_entries[i].job);
		ereport(ERROR,
				(errcode(ERRCODE_BG_NOT_FOUND),
				 errmsg("unknown job \"%s\"", job),
				 errdetail("Jobs: %s.", known.data),
				 errhint("select job, schedule, description from booking_guard.jobs;")));
	}
}

/* One call of a job function with (state or job, args) as the worker; returns the new state,
 * copied into the caller's memory context, and whether it is done. */
static Datum
job_call(const char *query, int nargs, Datum *args, Oid *argtypes, bool *done, MemoryContext into)
{
	AsWorker	as;
	Datum		state;
	bool		isnull;
	int			rc;
	MemoryContext oldcxt;

	become_worker(&as);
	rc = SPI_execute_with_args(query, nargs, argtypes, args, NULL, false, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "booking_guard: %s failed: %s", query, SPI_result_code_string(rc));
	state = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*done = isnull || DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	oldcxt = MemoryContextSwitchTo(into);
	state = isnull ? (Datum) 0 : PointerGetDatum(DatumGetJsonbPCopy(state));
	MemoryContextSwitchTo(oldcxt);
	end_worker(&as);
	return state;
}

static Datum
run_steps(const char *job, Datum args, bool nonatomic)
{
	Oid			begin_types[2] = {TEXTOID, JSONBOID};
	Oid			state_types[1] = {JSONBOID};
	Datum		begin_args[2];
	Datum		state;
	bool		done;
	MemoryContext caller = CurrentMemoryContext;

	/* the state lives in a context of its own: a COMMIT frees the transaction's memory */
	MemoryContext keep = AllocSetContextCreate(TopMemoryContext, "booking_guard job", ALLOCSET_SMALL_SIZES);

	check_may_run(job);
	begin_args[0] = CStringGetTextDatum(job);
	begin_args[1] = args;
	PG_TRY();
	{
		if (SPI_connect_ext(nonatomic ? SPI_OPT_NONATOMIC : 0) != SPI_OK_CONNECT)
			elog(ERROR, "booking_guard: SPI_connect failed");
		state = job_call("select s, (s ->> 'done')::boolean from booking_guard_internal.job_begin($1, $2) s",
						 2, begin_args, begin_types, &done, keep);
		while (!done)
		{
			if (nonatomic)
				SPI_commit();
			state = job_call("select s, (s ->> 'done')::boolean from booking_guard_internal.job_step($1) s",
							 1, &state, state_types, &done, keep);
		}
		if (nonatomic)
			SPI_commit();
		state = job_call("select s, true from booking_guard_internal.job_end($1) s", 1, &state, state_types, &done, keep);
		SPI_finish();
		MemoryContextSwitchTo(caller);
		state = PointerGetDatum(DatumGetJsonbPCopy(state));
	}
	PG_FINALLY();
	{
		MemoryContextDelete(keep);
	}
	PG_END_TRY();
	return state;
}

/*
 * booking_guard.run_job(job): a procedure. Called by CALL outside a transaction block (as pg_cron
 * does), it commits after every step, so that no row a job repairs stays locked for longer than
 * one batch; in a transaction block it runs every step in the caller's transaction.
 */
Datum
run_job(PG_FUNCTION_ARGS)
{
	bool		nonatomic = fcinfo->context != NULL && IsA(fcinfo->context, CallContext)
		&& !castNode(CallContext, fcinfo->context)->atomic;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_BG_BAD_INPUT),
				 errmsg("run_job() needs a job name"),
				 errdetail("job: null"),
				 errhint("call booking_guard.run_job('reconcile');")));
	/* scheduled: run_monitor looks only at what is new, every job works in job_batch_size batches */
	(void) run_steps(text_to_cstring(PG_GETARG_TEXT_PP(0)),
					 DirectFunctionCall1(jsonb_in, CStringGetDatum("{\"scheduled\": true}")), nonatomic);
	PG_RETURN_VOID();
}

/* booking_guard_internal.run_job_steps(job, args): the same steps in the caller's transaction,
 * for the functions reconcile(), run_monitor() and verify_due(); returns the final state. */
Datum
run_job_steps(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_NULL();
	PG_RETURN_DATUM(run_steps(text_to_cstring(PG_GETARG_TEXT_PP(0)), PG_GETARG_DATUM(1), false));
}

/* ---- record_booking()'s insert: a plan per table and set of keys, kept here ---- */

typedef struct InsertKey
{
	Oid			relid;
	char		keys[NAMEDATALEN * 4];	/* the object's keys, comma-separated; longer sets are not kept */
} InsertKey;

typedef struct InsertPlan
{
	InsertKey	key;
	SPIPlanPtr	plan;
	bool		valid;
} InsertPlan;

static HTAB *insert_plans;

/* At most this many insert plans are kept per session: every subset of a table's columns is a key
 * set of its own, and a caller sending many of them would otherwise grow the session's memory
 * without bound. A key set beyond them is planned for its call only. */
#define INSERT_PLANS_KEPT 64

/* A plan is planned against the table as it was: a change to the table marks its plans invalid
 * (the plan cache would replan by itself, but the column list was checked against the old table).
 * The plan is freed on its next use, never here: an invalidation may arrive while it runs. */
static void
insert_plans_invalidate(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS scan;
	InsertPlan *entry;

	if (insert_plans == NULL)
		return;
	hash_seq_init(&scan, insert_plans);
	while ((entry = hash_seq_search(&scan)) != NULL)
		if (relid == InvalidOid || entry->key.relid == relid)
			entry->valid = false;
}

/*
 * What the validation judges of an appointment, as record_booking()'s statements return it beside
 * their own work (the insert's and the orphan link's RETURNING, the lookup of the booking id): the
 * row as stored, without a statement of its own to read it back. Five columns, in
 * validation_verdict()'s order: id, call_id, booking id, created_at and its age in seconds.
 */
#define APPOINTMENT_FACTS(a) \
	a ".id::pg_catalog.int8, " a ".call_id::pg_catalog.int8, " a ".calcom_v2_booking_id::pg_catalog.text, " \
	a ".created_at::pg_catalog.text, pg_catalog.date_part('epoch', pg_catalog.now() operator(pg_catalog.-) " \
	a ".created_at::pg_catalog.timestamptz)"
#define NFACTS 5

static void row_values(uint64 row, int first, int n, Datum *values, bool *nulls);

/* The top-level keys of a jsonb object, in the object's own (fixed) order. */
static List *
object_keys(Jsonb *object)
{
	JsonbIterator *it = JsonbIteratorInit(&object->root);
	JsonbValue	v;
	JsonbIteratorToken token;
	List	   *keys = NIL;

	/* skipNested: the values of the top level come back whole, so every key seen is a top-level one */
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
		if (token == WJB_KEY)
			keys = lappend(keys, pnstrdup(v.val.string.val, v.val.string.len));
	return keys;
}

/*
 * Inserts the object's keys into the columns of the same names of the table and sets facts to the
 * new row's (APPOINTMENT_FACTS); false, facts all null, when no row was inserted (a trigger of the
 * application's swallowed it). Runs
 * as the caller: inserting is what the application could do itself, and the table owner's code on
 * the table runs with the application's rights. An unknown key is a BG005 naming the table's
 * columns. The caller is connected to SPI.
 */
static bool
insert_appointment(Oid relid, Jsonb *object, Datum *facts, bool *facts_null)
{
	List	   *keys;
	ListCell   *lc;
	StringInfoData joined;
	InsertKey	key;
	InsertPlan *entry = NULL;
	bool		found = false;
	SPIPlanPtr	plan;
	Datum		arg = PointerGetDatum(object);
	Oid			argtype = JSONBOID;
	int			rc;
	MemoryContext cxt = CurrentMemoryContext;

	keys = object_keys(object);
	initStringInfo(&joined);
	/* length-prefixed: keys may hold any character, and two key sets must never join alike */
	foreach(lc, keys)
		appendStringInfo(&joined, "%zu:%s,", strlen((char *) lfirst(lc)), (char *) lfirst(lc));

	if (insert_plans == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(InsertKey);
		ctl.entrysize = sizeof(InsertPlan);
		insert_plans = hash_create("booking_guard insert plans", 16, &ctl, HASH_ELEM | HASH_BLOBS);
	}
	memset(&key, 0, sizeof(key));
	key.relid = relid;
	if (joined.len < (int) sizeof(key.keys))
	{
		memcpy(key.keys, joined.data, joined.len);
		entry = hash_search(insert_plans, &key, HASH_FIND, &found);
	}

	if (found && entry->valid)
		plan = entry->plan;
	else
	{
		StringInfoData unknown, cols, query;
		char	   *nsp = get_namespace_name(get_rel_namespace(relid));
		char	   *table;

		if (nsp == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_BG_ATTACHMENT),
					 errmsg("booking_guard: the appointments table %u does not exist", relid),
					 errhint("Run select booking_guard.detach(); and attach the tables again.")));
		table = quote_qualified_identifier(nsp, get_rel_name(relid));
		if (found && entry->plan)
		{
			SPI_freeplan(entry->plan);
			entry->plan = NULL;
		}

		initStringInfo(&unknown);
		initStringInfo(&cols);
		foreach(lc, keys)
		{
			const char *name = lfirst(lc);
			AttrNumber	attnum = get_attnum(relid, name);

			if (attnum <= 0)
				appendStringInfo(&unknown, "%s%s", unknown.len ? ", " : "", name);
			appendStringInfo(&cols, "%s%s", cols.len ? ", " : "", quote_identifier(name));
		}
		if (unknown.len > 0)
		{
			StringInfoData known;
			int			natts;
			Relation	rel = RelationIdGetRelation(relid);

			initStringInfo(&known);
			natts = RelationIsValid(rel) ? RelationGetNumberOfAttributes(rel) : 0;
			for (int i = 0; i < natts; i++)
			{
				Form_pg_attribute att = TupleDescAttr(RelationGetDescr(rel), i);

				if (!att->attisdropped)
					appendStringInfo(&known, "%s%s", known.len ? ", " : "", NameStr(att->attname));
			}
			if (RelationIsValid(rel))
				RelationClose(rel);
			ereport(ERROR,
					(errcode(ERRCODE_BG_BAD_INPUT),
					 errmsg("record_booking(): unknown appointment field(s): %s", unknown.data),
					 errdetail("%s has no column(s) %s.", table, unknown.data),
					 errhint("Known columns: %s.", known.data)));
		}
		initStringInfo(&query);
		appendStringInfo(&query,
						 "insert into %s as t (%s) select %s from pg_catalog.jsonb_populate_record(null::%s, $1) r "
						 "returning " APPOINTMENT_FACTS("t"), table, cols.data, cols.data, table);
		plan = SPI_prepare(query.data, 1, &argtype);
		if (plan == NULL)
			elog(ERROR, "booking_guard: SPI_prepare failed for \"%s\": %s", query.data,
				 SPI_result_code_string(SPI_result));
		if (joined.len < (int) sizeof(key.keys)
			&& (found || hash_get_num_entries(insert_plans) < INSERT_PLANS_KEPT))
		{
			if (SPI_keepplan(plan) != 0)
				elog(ERROR, "booking_guard: SPI_keepplan failed");
			entry = hash_search(insert_plans, &key, HASH_ENTER, NULL);
			entry->plan = plan;
			entry->valid = true;
		}
	}
	rc = SPI_execute_plan(plan, &arg, NULL, false, 0);
	MemoryContextSwitchTo(cxt);
	if (rc != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "booking_guard: inserting the appointment failed: %s", SPI_result_code_string(rc));
	row_values(0, 1, NFACTS, facts, facts_null);
	return !facts_null[0];
}

/* ---- record_booking()'s steps ---- */

/*
 * The functions record_booking() calls, by OID, looked up once per session and again after any
 * change to pg_proc (a function replaced, the extension updated). Called through the function
 * manager, with the EXECUTE check a query would make, and a FmgrInfo made for each call (a
 * function's cached state never outlives the call): a SECURITY DEFINER one switches identity as in
 * a query.
 */
typedef struct KeptFunction
{
	const char *name;			/* in booking_guard_internal */
	int			nargs;
	Oid			argtypes[13];
	Oid			oid;			/* InvalidOid: look it up */
} KeptFunction;

enum
{
	FN_VALIDATION_VERDICT,
	FN_BOOKING_FAILED
};

static KeptFunction kept_functions[] = {
	[FN_VALIDATION_VERDICT] = {"validation_verdict", 13,
	{INT8OID, INT8OID, TEXTOID, FLOAT8OID, BOOLOID, TEXTOID, TEXTOID, INT8OID, INT8OID, TEXTOID, TEXTOID,
	FLOAT8OID, FLOAT8OID}},
	[FN_BOOKING_FAILED] = {"booking_failed", 6, {INT8OID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, INT8OID}},
};

static void
forget_kept_functions(Datum arg, int cacheid, uint32 hashvalue)
{
	for (int i = 0; i < lengthof(kept_functions); i++)
		kept_functions[i].oid = InvalidOid;
}

/* Calls a kept function with the given arguments (null where nulls[i]); returns its result. */
static Datum
call_kept(int which, Datum *args, bool *nulls, bool *result_null)
{
	KeptFunction *fn = &kept_functions[which];
	FmgrInfo	flinfo;
	LOCAL_FCINFO(fcinfo, 13);
	PgStat_FunctionCallUsage usage;
	Datum		result;

	if (!OidIsValid(fn->oid))
		fn->oid = internal_function(fn->name, fn->nargs, fn->argtypes);
	/* as a query calling it would: the caller needs EXECUTE on it */
	if (pg_proc_aclcheck(fn->oid, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
		aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_FUNCTION, fn->name);
	InvokeFunctionExecuteHook(fn->oid);
	fmgr_info(fn->oid, &flinfo);
	InitFunctionCallInfoData(*fcinfo, &flinfo, fn->nargs, InvalidOid, NULL, NULL);
	for (int i = 0; i < fn->nargs; i++)
	{
		fcinfo->args[i].value = args[i];
		fcinfo->args[i].isnull = nulls[i];
	}
	/* counted in pg_stat_user_functions as a query's call would be (track_functions) */
	pgstat_init_function_usage(fcinfo, &usage);
	result = FunctionCallInvoke(fcinfo);
	pgstat_end_function_usage(&usage, true);
	*result_null = fcinfo->isnull;
	return result;
}

/* The queries record_booking() keeps for the session, each prepared on first use. They run with
 * the caller's rights through the guarded views, and name everything down to its operators (they
 * are parsed under the caller's search_path). PostgreSQL plans them again by itself when the
 * tables change. */
enum
{
	Q_RECORDED,
	Q_LINK_ORPHAN,
	Q_FLAG_CALL,
	Q_WINDOW,
	Q_RECORDED_DETAILS
};

/* The validation window in seconds (null when the setting is missing: validation_verdict() says so). */
#define VALIDATION_WINDOW \
	"(select pg_catalog.date_part('epoch', s.interval_value) from booking_guard.settings s" \
	" where s.name operator(pg_catalog.=) 'validation_recent_window')"

static struct
{
	const char *query;
	int			nargs;
	Oid			argtypes[4];
	SPIPlanPtr	plan;
}			book_queries[] = {
	/* the appointments that carry the booking id (recorded_appointment() picks one), with the facts
	 * the validation judges when one is kept as it is */
	[Q_RECORDED] = {"select " APPOINTMENT_FACTS("a")
		" from booking_guard_internal.guarded_appointments a"
	" where a.calcom_v2_booking_id operator(pg_catalog.=) $1", 1, {TEXTOID}},
	/* the calendar's webhook was first: the orphaned appointment is linked to this call */
	[Q_LINK_ORPHAN] = {"update booking_guard_internal.guarded_appointments a"
		" set call_id = $1, updated_at = pg_catalog.now() where a.id operator(pg_catalog.=) $2"
		" returning " APPOINTMENT_FACTS("a"),
	2, {INT8OID, INT8OID}},
	/* the call's flags: with its appointment already there, the calls trigger finds the claim
	 * true and the commit-time check has nothing left to judge. Returns what the validation judges
	 * of the call as it now stands (no row: the call does not exist), and the window */
	[Q_FLAG_CALL] = {"update booking_guard_internal.guarded_calls g"
		" set appointment_made = true, session_outcome = 'appointment_booked',"
		" appointment_link_status = 'linked',"
		" appointment_linked_at = coalesce(g.appointment_linked_at, pg_catalog.now()),"
		" booking_id = coalesce(g.booking_id, $2), booking_confirmed = true, call_successful = true,"
		" updated_at = pg_catalog.now()"
		" where g.id operator(pg_catalog.=) $1"
		" returning g.retell_call_id::pg_catalog.text, g.booking_id::pg_catalog.text, " VALIDATION_WINDOW,
	2, {INT8OID, TEXTOID}},
	/* the window alone, when the call does not exist (the flags' update returned nothing) */
	[Q_WINDOW] = {"select " VALIDATION_WINDOW, 0, {InvalidOid}},
	/* a booking recorded before: what the result says about it */
	[Q_RECORDED_DETAILS] = {"select pg_catalog.jsonb_build_object('call_id', $1, 'appointment_id', $2,"
		" 'calcom_booking_id', $3, 'already_recorded', true)", 3, {INT8OID, INT8OID, TEXTOID}},
};

/* Runs one of record_booking()'s queries; returns in the memory context it was called in (SPI
 * leaves its own current after each query, and SPI_finish() frees that one). */
static void
run_book_query(int which, Datum *args, const char *nulls, int expected)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			rc;

	if (book_queries[which].plan == NULL)
		book_queries[which].plan = prepare_kept(book_queries[which].query, book_queries[which].nargs,
												book_queries[which].argtypes);
	rc = SPI_execute_plan(book_queries[which].plan, args, nulls, false, 0);
	MemoryContextSwitchTo(cxt);
	if (rc != expected)
		elog(ERROR, "booking_guard: record_booking() step %d failed: %s", which, SPI_result_code_string(rc));
}

/*
 * Serialises record_booking() calls of one booking id until the end of the caller's transaction
 * (or the savepoint it runs under, when that is rolled back): a heavyweight lock on a tag of the
 * booking id's own, taken here in C. Its tag is advisory-typed, but with a fourth field no SQL
 * function sets (pg_advisory_lock() and its kin use 1 and 2): no role can take, hold or release it
 * from SQL, so no squatter can make a booking wait, and it costs neither a write nor a dead row.
 * Two booking ids whose 64-bit hashes are equal share a lock: they only wait for each other.
 * pg_locks shows it as locktype advisory, objsubid 16967, classid and objid the hash.
 */
#define BOOKING_LOCK_SPACE 0x4247	/* "BG" */

static void
lock_booking_id(text *booking_id)
{
	LOCKTAG		tag;
	uint64		hash = DatumGetUInt64(hash_any_extended((unsigned char *) VARDATA_ANY(booking_id),
														 VARSIZE_ANY_EXHDR(booking_id), 0));

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (hash >> 32), (uint32) hash, BOOKING_LOCK_SPACE);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * record_booking()'s events, written as booking_guard_owner (the application's roles may neither
 * write booking_guard.events nor call anything that writes record_booking events for them): kept
 * for the session like book_queries, each prepared on first use. They touch only a table of
 * booking_guard's (no trigger, default or policy there is anyone else's) and name everything down
 * to its operators and functions, as they are parsed under the caller's search_path.
 *
 *   Q_EVENT   record_booking's event (which the booking metrics count), one row, $1 the call and
 *             $2 its details (booking_event_details()): with the validation's part under
 *             'validation' when one ran, which booking_guard.validation_events shows as the
 *             validation's event to the latency KPI, the validation metrics and detection
 */
enum
{
	Q_EVENT
};

static struct
{
	const char *query;
	int			nargs;
	Oid			argtypes[2];
	SPIPlanPtr	plan;
}			owner_queries[] = {
	[Q_EVENT] = {"insert into booking_guard.events (kind, entity_type, entity_id, details)"
		" values ('record_booking', 'call', $1::pg_catalog.text, $2)", 2, {INT8OID, JSONBOID}},
};

static void
push_key(JsonbParseState **state, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	pushJsonbValue(state, WJB_KEY, &v);
}

/* A numeric value under key; JSON null for a null pointer. */
static void
push_numeric(JsonbParseState **state, const char *key, Numeric value)
{
	JsonbValue	v;

	push_key(state, key);
	if (value == NULL)
		v.type = jbvNull;
	else
	{
		v.type = jbvNumeric;
		v.val.numeric = value;
	}
	pushJsonbValue(state, WJB_VALUE, &v);
}

static void
push_bool(JsonbParseState **state, const char *key, bool value)
{
	JsonbValue	v;

	push_key(state, key);
	v.type = jbvBool;
	v.val.boolean = value;
	pushJsonbValue(state, WJB_VALUE, &v);
}

/*
 * The details of record_booking()'s event, built here rather than by jsonb_build_object() in the
 * statement (which would print every number and parse it again): success, reason (at most 63
 * characters), appointment_id (null when refused), created, duration_ms, and, when a validation
 * ran, validation: {duration_ms, appointment_id} (the appointment it examined). The validation's
 * success and reason are the booking's.
 */
static Jsonb *
booking_event_details(bool success, text *reason, Numeric appointment, bool created, Numeric duration_ms,
					  bool validated, Numeric validation_ms, Numeric examined)
{
	JsonbParseState *state = NULL;
	JsonbValue	v;
	char	   *why = text_to_cstring(reason);

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	push_bool(&state, "success", success);
	push_key(&state, "reason");
	v.type = jbvString;
	v.val.string.val = why;
	v.val.string.len = pg_mbcharcliplen(why, strlen(why), 63);
	pushJsonbValue(&state, WJB_VALUE, &v);
	push_numeric(&state, "appointment_id", appointment);
	push_bool(&state, "created", created);
	push_numeric(&state, "duration_ms", duration_ms);
	if (validated)
	{
		push_key(&state, "validation");
		pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
		push_numeric(&state, "duration_ms", validation_ms);
		push_numeric(&state, "appointment_id", examined);
		pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	}
	return JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
}

/* Runs one of owner_queries as booking_guard_owner; returns in the memory context it was called in. */
static void
run_owner_query(int which, Datum *args, const char *nulls, int expected)
{
	MemoryContext cxt = CurrentMemoryContext;
	AsWorker	as;
	int			rc;

	become_owner(&as);
	if (owner_queries[which].plan == NULL)
		owner_queries[which].plan = prepare_kept(owner_queries[which].query, owner_queries[which].nargs,
												 owner_queries[which].argtypes);
	rc = SPI_execute_plan(owner_queries[which].plan, args, nulls, false, 0);
	end_worker(&as);
	MemoryContextSwitchTo(cxt);
	if (rc != expected)
		elog(ERROR, "booking_guard: record_booking() write %d failed: %s", which, SPI_result_code_string(rc));
}

/* One column of a row of the last query's result, copied out of SPI's memory (null when the result
 * has no such row). */
static Datum
row_value(uint64 row, int column, bool *isnull)
{
	Datum		value;

	if (row >= SPI_processed)
	{
		*isnull = true;
		return (Datum) 0;
	}
	value = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, column, isnull);
	return *isnull ? value : SPI_datumTransfer(value, TupleDescAttr(SPI_tuptable->tupdesc, column - 1)->attbyval,
											   TupleDescAttr(SPI_tuptable->tupdesc, column - 1)->attlen);
}

/* n columns of a row of the last query's result, from column first on. */
static void
row_values(uint64 row, int first, int n, Datum *values, bool *nulls)
{
	for (int i = 0; i < n; i++)
		values[i] = row_value(row, first + i, &nulls[i]);
}

/* One column of the first row of the last query's result. */
static Datum
result_value(int column, bool *isnull)
{
	return row_value(0, column, isnull);
}

/*
 * The appointment the booking id is recorded under, of those the last query found: the call's own
 * (the first of them), else an orphan (no call), else the first; false when there is none. Its
 * facts (APPOINTMENT_FACTS) are copied to facts, all null when there is none. Chosen
 * here rather than by ORDER BY ... LIMIT 1: a booking id has one appointment or none, and the
 * sort's executor nodes cost more than looking at that one.
 */
static bool
recorded_appointment(int64 call_id, int64 *id, bool *call_null, int64 *call, Datum *facts, bool *facts_null)
{
	int			best = -1;
	int			best_rank = 0;
	int64		best_id = 0;

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull, no_call;
		int64		this_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		Datum		this_call = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &no_call);
		int			rank = !no_call && DatumGetInt64(this_call) == call_id ? 3 : no_call ? 2 : 1;

		if (isnull)
			continue;
		if (best < 0 || rank > best_rank || (rank == best_rank && this_id < best_id))
		{
			best = (int) i;
			best_rank = rank;
			best_id = this_id;
			*call_null = no_call;
			*call = no_call ? 0 : DatumGetInt64(this_call);
		}
	}
	*id = best_id;
	row_values(best < 0 ? SPI_processed : (uint64) best, 1, NFACTS, facts, facts_null);
	return best >= 0;
}

/* Unix time of a timestamptz, as validation_verdict() takes it. */
static double
unix_seconds(TimestampTz t)
{
	return (double) t / USECS_PER_SEC + (double) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY;
}

/* record_booking()'s input, checked: bad input is BG005 and writes nothing. */
static void
bad_booking_input(const char *message, const char *detail, const char *hint)
{
	ereport(ERROR, (errcode(ERRCODE_BG_BAD_INPUT), errmsg_internal("%s", message), errdetail_internal("%s", detail),
					errhint("%s", hint)));
}

/* Whether the text matches the pattern, under the database's collation: a COLLATE clause of the
 * caller's cannot change what the input checks accept. */
static bool
text_matches(text *value, const char *pattern, Oid collation)
{
	return DatumGetBool(DirectFunctionCall2Coll(textregexeq, collation, PointerGetDatum(value),
												CStringGetTextDatum(pattern)));
}

/*
 * Whether a booking id is printable and not blank: a character that is not white space, and no
 * control character, as the regular expressions \S and [[:cntrl:]] judge it under the database's
 * collation. ASCII text is judged here (its space and control characters are the same under every
 * locale and provider: a control character is rejected whatever its class of space, and the only
 * other ASCII space is ' '), other text by the regular expressions.
 */
static bool
booking_id_printable(text *id)
{
	const unsigned char *p = (const unsigned char *) VARDATA_ANY(id);
	int			len = VARSIZE_ANY_EXHDR(id);
	bool		visible = false;

	for (int i = 0; i < len; i++)
	{
		if (p[i] >= 0x80)
			return text_matches(id, "\\S", DEFAULT_COLLATION_OID)
				&& !text_matches(id, "[[:cntrl:]]", DEFAULT_COLLATION_OID);
		if (p[i] < 0x20 || p[i] == 0x7f)
			return false;
		visible |= p[i] != ' ';
	}
	return visible;
}

/* The first n characters of a text. */
static char *
text_prefix(text *value, int n)
{
	char	   *s = text_to_cstring(value);

	s[pg_mbcharcliplen(s, strlen(s), n)] = '\0';
	return s;
}

static char *
jsonb_prefix(Jsonb *value, int n)
{
	char	   *s = JsonbToCString(NULL, &value->root, VARSIZE(value));

	s[pg_mbcharcliplen(s, strlen(s), n)] = '\0';
	return s;
}

/*
 * The appointment as record_booking() takes it: an object (an empty array, as some JSON encoders
 * write an empty map, is one) of at most 64 kB.
 */
static Jsonb *
booking_appointment(FunctionCallInfo fcinfo)
{
	Jsonb	   *payload;

	if (PG_ARGISNULL(2))
		return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	payload = PG_GETARG_JSONB_P(2);
	if (JB_ROOT_IS_ARRAY(payload) && !JB_ROOT_IS_SCALAR(payload) && JB_ROOT_COUNT(payload) == 0)
		return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	if (!JB_ROOT_IS_OBJECT(payload))
	{
		char	   *type = TextDatumGetCString(DirectFunctionCall1(jsonb_typeof, JsonbPGetDatum(payload)));

		bad_booking_input(psprintf("record_booking(): the appointment must be a jsonb object, not %s", type),
						  psprintf("appointment: %s", jsonb_prefix(payload, 200)),
						  "Pass the appointment's columns as an object: '{\"service_id\": 7, \"staff_id\": 3}'.");
	}
	/* its size as stored in memory: a compressed argument counts at its full size */
	if (VARSIZE(payload) > 65536)
		bad_booking_input(psprintf("record_booking(): the appointment is too large: %zu bytes",
								   (size_t) VARSIZE(payload)),
						  "An appointment's columns fit in 64 kB.",
						  "Pass the appointment's columns, not documents: keep large texts out of the booking call.");
	return payload;
}

/*
 * The appointment's columns for the insert: call_id and calcom_v2_booking_id, when the object gives
 * them, must be the arguments (BG005 otherwise); they are set from the arguments.
 */
static Jsonb *
booking_columns(Jsonb *payload, int64 call_id, text *booking_id)
{
	StringInfoData conflicting;
	const char *keys[2] = {"calcom_v2_booking_id", "call_id"};	/* in the order the message names them */
	char	   *args[2];
	JsonbParseState *state = NULL;
	JsonbValue	v;
	JsonbValue *merged;

	args[0] = text_to_cstring(booking_id);
	args[1] = psprintf(INT64_FORMAT, call_id);
	initStringInfo(&conflicting);
	for (int i = 0; i < 2; i++)
	{
		JsonbValue *given = getKeyJsonValueFromContainer(&payload->root, keys[i], strlen(keys[i]), NULL);
		char	   *as_text = NULL;

		if (given == NULL)
			continue;
		/* as ->> gives it: a string's contents, a scalar's text, null for JSON null */
		if (given->type == jbvString)
			as_text = pnstrdup(given->val.string.val, given->val.string.len);
		else if (given->type != jbvNull)
		{
			JsonbValue *scalar = given;

			if (scalar->type == jbvBinary)
				as_text = JsonbToCString(NULL, scalar->val.binary.data, scalar->val.binary.len);
			else
			{
				Jsonb	   *wrapped = JsonbValueToJsonb(scalar);

				as_text = JsonbToCString(NULL, &wrapped->root, VARSIZE(wrapped));
			}
		}
		if (as_text == NULL || strcmp(as_text, args[i]) != 0)
			appendStringInfo(&conflicting, "%s%s (%s, the argument says %s)", conflicting.len ? "; " : "", keys[i],
							 as_text ? as_text : "", args[i]);
	}
	if (conflicting.len > 0)
		bad_booking_input(psprintf("record_booking(): the appointment contradicts the arguments: %s", conflicting.data),
						  "call_id and calcom_v2_booking_id of the appointment are taken from record_booking's arguments.",
						  "Leave them out of the appointment object.");

	/* the appointment's columns, with call_id and calcom_v2_booking_id from the arguments */
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	v.type = jbvString;
	v.val.string.val = "call_id";
	v.val.string.len = strlen("call_id");
	pushJsonbValue(&state, WJB_KEY, &v);
	v.type = jbvNumeric;
	v.val.numeric = DatumGetNumeric(DirectFunctionCall1(int8_numeric, Int64GetDatum(call_id)));
	pushJsonbValue(&state, WJB_VALUE, &v);
	v.type = jbvString;
	v.val.string.val = "calcom_v2_booking_id";
	v.val.string.len = strlen("calcom_v2_booking_id");
	pushJsonbValue(&state, WJB_KEY, &v);
	v.type = jbvString;
	v.val.string.val = VARDATA_ANY(booking_id);
	v.val.string.len = VARSIZE_ANY_EXHDR(booking_id);
	pushJsonbValue(&state, WJB_VALUE, &v);
	merged = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(payload),
											  JsonbPGetDatum(JsonbValueToJsonb(merged))));
}

/*
 * booking_guard.record_booking(call_id, calcom_booking_id, appointment): one booking as one C call:
 *
 *   1. checks its input; bad input is BG005 and writes nothing
 *   2. serialises on the booking id (lock_booking_id(): a lock no role can take from SQL) and
 *      looks the booking up: recorded before for this call, nothing is created
 *   3. in a subtransaction: inserts the appointment (the object's keys onto the table's columns) or
 *      links the orphan that carries the booking id; flags the call; judges both rows, as those
 *      statements return them (no statement reads them back), with validation_verdict()
 *      (PL/Python, the rules of validate_appointment_creation()); a failed verdict undoes the subtransaction, and booking_failed() (PL/pgSQL) rolls the call back,
 *      alerts and queues it for review
 *   4. logs its event, with the validation's part (Q_EVENTS as booking_guard_owner, one
 *      statement)
 *
 * Runs as the caller: every write to the application is one the caller could make itself; only
 * the events, in booking_guard's own table, are written as booking_guard_owner.
 * Idempotency needs each call to see the appointments committed before it took the lock: READ
 * COMMITTED does, SERIALIZABLE detects the conflict, REPEATABLE READ is refused.
 */
Datum
record_booking(PG_FUNCTION_ARGS)
{
	TimestampTz started = GetCurrentTimestamp();
	int64		call_id;
	text	   *booking_id;
	Jsonb	   *payload;
	Datum		appointment;
	bool		appointment_null;
	TupleDesc	result_desc;
	Datum		values[5];
	bool		nulls[5] = {false, false, false, false, false};
	Datum		args[13];
	bool		arg_nulls[13];
	bool		isnull;
	bool		existing_null, existing_call_null;
	int64		existing_id = 0, existing_call = 0;
	int64		the_id = 0;
	bool		the_id_null = true;
	bool		validated = false;
	bool		success = false;
	Datum		reason = (Datum) 0;
	Datum		details = (Datum) 0;
	Numeric		validation_ms = NULL;
	Numeric		examined = NULL;	/* the appointment the validation examined */
	Numeric		recorded = NULL;	/* the appointment, for the event (none when refused) */
	Numeric		duration_ms;
	bool		created = false;
	Datum		refusal = (Datum) 0;
	Datum		facts[NFACTS];	/* the appointment's, as validation_verdict() takes them */
	bool		facts_null[NFACTS];
	MemoryContext caller = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	/* 1. the input */
	if (get_call_result_type(fcinfo, NULL, &result_desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "booking_guard.record_booking() must return booking_guard.booking_result");
	booking_id = PG_ARGISNULL(1) ? NULL : PG_GETARG_TEXT_PP(1);
	if (PG_ARGISNULL(0) || booking_id == NULL || !booking_id_printable(booking_id)
		|| DatumGetInt32(DirectFunctionCall1(textlen, PointerGetDatum(booking_id))) > 255)
		bad_booking_input("record_booking() needs a call id and a Cal.com booking id",
						  psprintf("call_id: %s, calcom_booking_id: %s",
								   PG_ARGISNULL(0) ? "null" : psprintf(INT64_FORMAT, PG_GETARG_INT64(0)),
								   booking_id == NULL ? "null"
								   : TextDatumGetCString(DirectFunctionCall1(quote_literal,
																			 CStringGetTextDatum(text_prefix(booking_id, 100))))),
						  "The booking id is 1 to 255 printable characters: "
						  "select * from booking_guard.record_booking(42, 'cal-123', '{\"service_id\": 7}');");
	call_id = PG_GETARG_INT64(0);
	payload = booking_appointment(fcinfo);
	if (XactIsoLevel == XACT_REPEATABLE_READ)
		bad_booking_input("record_booking() cannot run in a REPEATABLE READ transaction",
						  "Its idempotency needs to see appointments committed by concurrent sessions after this "
						  "transaction's snapshot was taken.",
						  "Use READ COMMITTED (the default) or SERIALIZABLE.");
	payload = booking_columns(payload, call_id, booking_id);
	appointment = PG_GETARG_DATUM(2);
	appointment_null = PG_ARGISNULL(2);

	if (!attachment.known)
		load_attachment();
	if (!OidIsValid(attachment.appointments))
		ereport(ERROR,
				(errcode(ERRCODE_BG_ATTACHMENT),
				 errmsg("booking_guard is not attached"),
				 errdetail("No calls and appointments tables have been attached in this database."),
				 errhint("select booking_guard.attach('public.calls', 'public.appointments');")));

	/* 2. the booking id's lock, then what is recorded under it */
	lock_booking_id(booking_id);

	/* connected to SPI, but working in the caller's memory: what is kept outlives SPI_finish() */
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "booking_guard: SPI_connect failed");
	MemoryContextSwitchTo(caller);
	args[0] = PointerGetDatum(booking_id);
	run_book_query(Q_RECORDED, args, NULL, SPI_OK_SELECT);
	existing_call_null = true;
	existing_null = !recorded_appointment(call_id, &existing_id, &existing_call_null, &existing_call, facts,
										  facts_null);

	if (!existing_call_null && existing_call == call_id)
	{
		/* recorded before: the first appointment stands, nothing is created */
		args[0] = Int64GetDatum(call_id);
		args[1] = Int64GetDatum(existing_id);
		args[2] = PointerGetDatum(booking_id);
		run_book_query(Q_RECORDED_DETAILS, args, NULL, SPI_OK_SELECT);
		success = true;
		reason = CStringGetTextDatum("ok");
		details = result_value(1, &isnull);
		if (isnull)
			elog(ERROR, "booking_guard: record_booking() found no details of booking %s", text_to_cstring(booking_id));
		the_id = existing_id;
		the_id_null = false;
	}
	else
	{
		/* 3. write and judge, in a subtransaction */
		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(caller);
		PG_TRY();
		{
			Datum		verdict;
			HeapTupleHeader row;
			bool		call_found;

			if (existing_null)
			{
				the_id_null = !insert_appointment(attachment.appointments, payload, facts, facts_null);
				the_id = the_id_null ? 0 : DatumGetInt64(facts[0]);
			}
			else
			{
				the_id = existing_id;
				the_id_null = false;
				if (existing_call_null)
				{
					args[0] = Int64GetDatum(call_id);
					args[1] = Int64GetDatum(existing_id);
					run_book_query(Q_LINK_ORPHAN, args, NULL, SPI_OK_UPDATE_RETURNING);
					row_values(0, 1, NFACTS, facts, facts_null);
				}
				/* else the booking belongs to another call (facts as the lookup found them): the
				 * validation says so */
			}
			args[0] = Int64GetDatum(call_id);
			args[1] = PointerGetDatum(booking_id);
			run_book_query(Q_FLAG_CALL, args, NULL, SPI_OK_UPDATE_RETURNING);

			/* what validation_verdict() judges: the call as the update left it (the retell id,
			 * its booking id), the appointment (facts), the window */
			call_found = SPI_processed > 0;
			if (call_found)
			{
				args[5] = result_value(1, &arg_nulls[5]);
				args[6] = result_value(2, &arg_nulls[6]);
				args[12] = result_value(3, &arg_nulls[12]);
			}
			else
			{
				/* an appointment is only looked at for a call that exists */
				args[5] = args[6] = (Datum) 0;
				arg_nulls[5] = arg_nulls[6] = true;
				for (int i = 0; i < NFACTS; i++)
					facts_null[i] = true;
				run_book_query(Q_WINDOW, NULL, NULL, SPI_OK_SELECT);
				args[12] = result_value(1, &arg_nulls[12]);
			}
			args[0] = Int64GetDatum(call_id);
			arg_nulls[0] = false;
			args[1] = Int64GetDatum(the_id);
			arg_nulls[1] = the_id_null;
			args[2] = PointerGetDatum(booking_id);
			arg_nulls[2] = false;
			args[3] = Float8GetDatum(unix_seconds(GetCurrentTimestamp()));
			arg_nulls[3] = false;
			args[4] = BoolGetDatum(call_found);
			arg_nulls[4] = false;
			for (int i = 0; i < NFACTS; i++)
			{
				args[7 + i] = facts[i];
				arg_nulls[7 + i] = facts_null[i];
			}
			verdict = call_kept(FN_VALIDATION_VERDICT, args, arg_nulls, &isnull);
			if (isnull)
				elog(ERROR, "booking_guard_internal.validation_verdict() returned null");
			row = DatumGetHeapTupleHeader(verdict);
			success = DatumGetBool(GetAttributeByNum(row, 1, &isnull)) && !isnull;
			reason = GetAttributeByNum(row, 2, &isnull);
			if (isnull)
				elog(ERROR, "booking_guard_internal.validation_verdict() returned no reason");
			details = GetAttributeByNum(row, 3, &isnull);
			if (isnull)
				elog(ERROR, "booking_guard_internal.validation_verdict() returned no details");
			validated = true;

			if (success)
				ReleaseCurrentSubTransaction();
			else
				RollbackAndReleaseCurrentSubTransaction();	/* the call's flags, the appointment */
			MemoryContextSwitchTo(caller);
			CurrentResourceOwner = owner;
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			int			category;

			MemoryContextSwitchTo(caller);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(caller);
			CurrentResourceOwner = owner;
			category = ERRCODE_TO_CATEGORY(edata->sqlerrcode);
			if (category == ERRCODE_DATA_EXCEPTION || category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION)
			{
				char	   *text = jsonb_prefix(payload, 500);
				char	   *table = quote_qualified_identifier(get_namespace_name(get_rel_namespace(attachment.appointments)),
															   get_rel_name(attachment.appointments));

				ereport(ERROR,
						(errcode(ERRCODE_BG_BAD_INPUT),
						 errmsg("record_booking(): the appointment for booking %s cannot be stored: %s",
								text_to_cstring(booking_id), edata->message),
						 errdetail("appointment: %s; the server said: %s (SQLSTATE %s)", text, edata->message,
								   unpack_sql_state(edata->sqlerrcode)),
						 errhint("Give values that fit the columns and constraints of %s.", table)));
			}
			ReThrowError(edata);
		}
		PG_END_TRY();

		if (!success)
		{
			/* the refusal, in the caller's transaction: the call rolled back, an alert, a review item */
			args[0] = Int64GetDatum(call_id);
			arg_nulls[0] = false;
			args[1] = PointerGetDatum(booking_id);
			arg_nulls[1] = false;
			args[2] = reason;
			arg_nulls[2] = false;
			args[3] = details;
			arg_nulls[3] = false;
			args[4] = appointment;
			arg_nulls[4] = appointment_null;
			args[5] = Int64GetDatum(the_id);
			arg_nulls[5] = !existing_null || the_id_null;	/* an appointment this call inserted */
			refusal = call_kept(FN_BOOKING_FAILED, args, arg_nulls, &isnull);
			if (isnull)
				elog(ERROR, "booking_guard_internal.booking_failed() returned no details");
		}
		created = success && existing_null;
	}

	/* 4. the event: record_booking's, with the validation's part when one ran */
	if (validated)
	{
		Jsonb	   *facts = DatumGetJsonbP(details);
		JsonbValue *ms = getKeyJsonValueFromContainer(&facts->root, "duration_ms", strlen("duration_ms"), NULL);
		JsonbValue *seen = getKeyJsonValueFromContainer(&facts->root, "appointment_id", strlen("appointment_id"), NULL);

		validation_ms = ms != NULL && ms->type == jbvNumeric
			? ms->val.numeric : DatumGetNumeric(DirectFunctionCall1(int4_numeric, Int32GetDatum(0)));
		/* as an id: a fraction is an error, as the cast to bigint would make it */
		if (seen != NULL && seen->type == jbvNumeric)
			examined = DatumGetNumeric(DirectFunctionCall1(int8_numeric,
														   DirectFunctionCall1(numeric_int8,
																			   NumericGetDatum(seen->val.numeric))));
	}
	if (success && !the_id_null)
		recorded = DatumGetNumeric(DirectFunctionCall1(int8_numeric, Int64GetDatum(the_id)));
	duration_ms = DatumGetNumeric(DirectFunctionCall2(numeric_round,
													  DirectFunctionCall1(float8_numeric,
																		  Float8GetDatum((GetCurrentTimestamp() - started) / 1000.0)),
													  Int32GetDatum(3)));
	args[0] = Int64GetDatum(call_id);
	args[1] = JsonbPGetDatum(booking_event_details(success, DatumGetTextPP(reason), recorded, created, duration_ms,
												   validated, validation_ms, examined));
	run_owner_query(Q_EVENT, args, NULL, SPI_OK_INSERT);
	SPI_finish();

	/* the result: success, reason, details, the appointment (none when refused), created */
	values[0] = BoolGetDatum(success);
	values[1] = reason;
	values[2] = success ? details : refusal;
	values[3] = Int64GetDatum(the_id);
	nulls[3] = !success || the_id_null;
	values[4] = BoolGetDatum(created);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(result_desc), values, nulls)));
}
